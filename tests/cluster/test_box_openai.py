"""The existing OpenAI suite, against prefill and decode on different nodes of the box:
the same test functions, with the box's `cluster`, `openai_client` and `http` fixtures
(tests/cluster/conftest.py) in place of the single-node ones."""

from tests.integration.test_openai_api import *  # noqa: F403 - the suite, collected here again
