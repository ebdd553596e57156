# Tandem: the two commands are `make run` (start the service) and `make test` (run the suite).
# Both install what is missing first: a venv in .venv, the packages, the default model.

comma  := ,
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
# Extras for this machine: the CPU build of vLLM by default; `make install EXTRAS=gpu,nixl,dev`
# on an NVIDIA host.
EXTRAS ?= cpu,nixl,dev
STAMP  := $(VENV)/.install-stamp-$(subst $(comma),-,$(EXTRAS))

PYTEST_ARGS ?=

.PHONY: install model run up down status test test-unit test-cluster lint loadtest image clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	PYTHON=$(PYTHON) VENV=$(VENV) EXTRAS=$(EXTRAS) bash scripts/install.sh
	touch $@

model: install
	$(BIN)/tandem model prepare

# Starts local Redis, Ray and the Serve app, then returns; `make down` stops them.
run: model
	$(BIN)/tandem up

up: run

status:
	$(BIN)/tandem status

down:
	$(BIN)/tandem down

# The whole suite: unit tests, then integration tests on one shared local Ray + vLLM cluster
# (started with `make run` by the test session itself), then, in a session of their own, the
# cluster-in-a-box tests (several Ray nodes in network namespaces; root, skipped without it
# except in CI). pytest's exit 5 (no tests) fails.
test: model
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	$(BIN)/python -m pytest tests/cluster $(PYTEST_ARGS)

test-cluster: model
	$(BIN)/python -m pytest tests/cluster $(PYTEST_ARGS)

test-unit: install
	$(BIN)/python -m pytest -m "not integration" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check control_plane workers routing kv_transport loadtest bench tests

# Locust against the running stack (`make run` first); e.g. LOADTEST_ARGS="--shape spike -t 120".
LOADTEST_ARGS ?=
loadtest: install
	$(BIN)/tandem loadtest $(LOADTEST_ARGS)

# The container image (Dockerfile) with docker or podman: IMAGE, BASE_IMAGE, EXTRAS, BAKE_MODEL
# (scripts/image.sh). Without a registry: BASE_IMAGE from scripts/debian-base.sh.
IMAGE ?= tandem:latest
image:
	IMAGE=$(IMAGE) bash scripts/image.sh

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
