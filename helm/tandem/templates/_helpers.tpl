{{/* Names ------------------------------------------------------------------------------ */}}

{{- define "tandem.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Kept short: KubeRay appends "-raycluster-xxxxx" and pod suffixes to the RayService name. */}}
{{- define "tandem.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains (include "tandem.name" .) .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "tandem.name" .) | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tandem.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tandem.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tandem.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "tandem.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tandem
{{- end -}}

{{- define "tandem.redisName" -}}{{ include "tandem.fullname" . }}-redis{{- end -}}
{{- define "tandem.serveServiceName" -}}{{ include "tandem.fullname" . }}-openai{{- end -}}
{{- define "tandem.apiKeySecretName" -}}
{{- .Values.auth.existingSecret | default (printf "%s-api-key" (include "tandem.fullname" .)) -}}
{{- end -}}

{{/* "true" when the endpoint takes API keys from a Secret (the chart's or yours). */}}
{{- define "tandem.kvSecretName" -}}
{{- .Values.auth.kvExistingSecret | default (printf "%s-kv" (include "tandem.fullname" .)) -}}
{{- end -}}

{{- define "tandem.apiKeyEnabled" -}}
{{- if or .Values.auth.existingSecret .Values.auth.apiKey (not .Values.auth.allowUnauthenticated) -}}
true
{{- end -}}
{{- end -}}

{{/* Engine roles of the chosen mode: the worker groups to create. */}}
{{- define "tandem.roles" -}}
{{- if eq (.Values.tandem.mode | default "disaggregated") "colocated" -}}
colocated
{{- else -}}
prefill decode
{{- end -}}
{{- end -}}

{{/* Redis ------------------------------------------------------------------------------ */}}

{{/* "true" when the internal Redis requires a password (redis.internal.auth). */}}
{{- define "tandem.redisAuthEnabled" -}}
{{- if and (eq .Values.redis.mode "internal") .Values.redis.internal.auth.enabled -}}
true
{{- end -}}
{{- end -}}

{{/* The Secret and key holding the internal Redis's password (the chart's or yours). */}}
{{- define "tandem.redisAuthSecretName" -}}
{{- .Values.redis.internal.auth.existingSecret | default (printf "%s-redis-auth" (include "tandem.fullname" .)) -}}
{{- end -}}

{{- define "tandem.redisAuthSecretKey" -}}
{{- if .Values.redis.internal.auth.existingSecret -}}
{{ .Values.redis.internal.auth.existingSecretKey }}
{{- else -}}
redis-password
{{- end -}}
{{- end -}}

{{/* The Redis URL without secrets: Tandem gets it in its settings. Empty when the URL holds a
     secret and so reaches Tandem only through env (an external URL from your Secret, or the
     internal Redis with a password). An external URL (redis:// or rediss:// for TLS) is
     passed through unchanged. */}}
{{- define "tandem.redisUrl" -}}
{{- if eq .Values.redis.mode "internal" -}}
{{- if not (include "tandem.redisAuthEnabled" .) -}}
redis://{{ include "tandem.redisName" . }}:6379/0
{{- end -}}
{{- else if .Values.redis.external.url -}}
{{ .Values.redis.external.url }}
{{- end -}}
{{- end -}}

{{- define "tandem.gcsRedisAddress" -}}
{{- if .Values.gcsFaultTolerance.redisAddress -}}
{{ .Values.gcsFaultTolerance.redisAddress }}
{{- else if eq .Values.redis.mode "internal" -}}
{{ include "tandem.redisName" . }}:6379
{{- else if .Values.redis.external.url -}}
{{ (urlParse .Values.redis.external.url).host }}
{{- else -}}
{{ fail "gcsFaultTolerance.enabled with redis.external.existingSecret: set gcsFaultTolerance.redisAddress (host:port) too; the URL in the Secret cannot be read at install time" }}
{{- end -}}
{{- end -}}

{{/* Checks the schema cannot express, failing the install with a clear message. */}}
{{- define "tandem.validate" -}}
{{- if and (eq .Values.redis.mode "external") (not .Values.redis.external.url) (not .Values.redis.external.existingSecret) -}}
{{ fail "redis.mode=external needs redis.external.url or redis.external.existingSecret" }}
{{- end -}}
{{- if and .Values.redis.external.url .Values.redis.external.existingSecret -}}
{{ fail "set only one of redis.external.url and redis.external.existingSecret" }}
{{- end -}}
{{- $gcs := .Values.gcsFaultTolerance -}}
{{- if and $gcs.enabled (eq .Values.redis.mode "external") .Values.redis.external.url (not $gcs.redisAddress) -}}
{{- $url := urlParse .Values.redis.external.url -}}
{{- if eq $url.scheme "rediss" -}}
{{ fail "gcsFaultTolerance.enabled with a rediss:// redis.external.url: the chart passes Ray's GCS a plain host:port, not TLS; set gcsFaultTolerance.redisAddress (and Ray's Redis TLS env on the head, head.env) yourself, see docs/deploy.md" }}
{{- end -}}
{{- if and $url.userinfo (not $gcs.redisPasswordSecret) -}}
{{ fail "gcsFaultTolerance.enabled with a password in redis.external.url: set gcsFaultTolerance.redisPasswordSecret (a Secret key holding that password) so Ray's GCS can log in" }}
{{- end -}}
{{- end -}}
{{- range $role := splitList " " (include "tandem.roles" .) -}}
{{- $pool := index $.Values.tandem $role | default dict -}}
{{- $group := index $.Values.workerGroups $role -}}
{{- if and (gt (int $group.gpus) 0) (not (gt (float64 ($pool.num_gpus | default 0)) 0.0)) -}}
{{ fail (printf "workerGroups.%s.gpus is %v but tandem.%s.num_gpus is 0: engines would not use the GPUs; set tandem.%s.num_gpus (GPUs per engine)" $role $group.gpus $role $role) }}
{{- end -}}
{{- if gt (mulf (float64 ($pool.num_gpus | default 0)) (float64 $group.enginesPerPod)) (float64 $group.gpus) -}}
{{ fail (printf "tandem.%s.num_gpus x workerGroups.%s.enginesPerPod needs %v GPUs per pod but workerGroups.%s.gpus is %v" $role $role (mulf (float64 ($pool.num_gpus | default 0)) (float64 $group.enginesPerPod)) $role $group.gpus) }}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Settings ---------------------------------------------------------------------------- */}}

{{/* The app builder's args: .Values.tandem plus what the chart owns (bind address, port,
     Redis, each pool's placement resource). Returned as YAML; callers fromYaml it. */}}
{{- define "tandem.settingsArgs" -}}
{{- $args := deepCopy .Values.tandem -}}
{{- $_ := set $args "host" "0.0.0.0" -}}
{{- $_ := set $args "port" (int .Values.serve.port) -}}
{{- $url := include "tandem.redisUrl" . -}}
{{- if $url -}}
{{- $_ := set $args "redis_url" $url -}}
{{- end -}}
{{- if not (include "tandem.apiKeyEnabled" .) -}}
{{- $auth := get $args "auth" | default dict -}}
{{- $_ := set $auth "allow_unauthenticated" true -}}
{{- $_ := set $args "auth" $auth -}}
{{- end -}}
{{- range $role := splitList " " (include "tandem.roles" .) -}}
{{- $pool := get $args $role | default dict -}}
{{- $resources := get $pool "ray_resources" | default dict -}}
{{- $resourceName := printf "tandem_%s" $role -}}
{{- if not (hasKey $resources $resourceName) -}}
{{- $_ := set $resources $resourceName 1 -}}
{{- end -}}
{{- $_ := set $pool "ray_resources" $resources -}}
{{- $_ := set $args $role $pool -}}
{{- end -}}
{{- toYaml $args -}}
{{- end -}}

{{/* Ray Serve's config for the RayService (serveConfigV2 is this, as a YAML string). */}}
{{- define "tandem.serveConfig" -}}
{{- $args := include "tandem.settingsArgs" . | fromYaml -}}
{{- $app := dict "name" ($args.app_name | default "tandem") "route_prefix" ($args.route_prefix | default "/") "import_path" "control_plane.app:build_app" "args" $args -}}
{{- if .Values.serve.runtimeEnv -}}
{{- $_ := set $app "runtime_env" .Values.serve.runtimeEnv -}}
{{- end -}}
{{- $config := dict "proxy_location" "EveryNode" "http_options" (dict "host" "0.0.0.0" "port" (int .Values.serve.port)) "applications" (list $app) -}}
{{- toYaml $config -}}
{{- end -}}

{{/* Pods -------------------------------------------------------------------------------- */}}

{{/* Pod count for an engine count: ceil(engines / enginesPerPod). Args: list engines perPod. */}}
{{- define "tandem.podsFor" -}}
{{- $engines := int (index . 0) -}}
{{- $perPod := int (index . 1) -}}
{{- div (add $engines (sub $perPod 1)) $perPod -}}
{{- end -}}

{{/* Ray's custom resources as rayStartParams wants them: a JSON object, itself quoted. */}}
{{- define "tandem.rayResourcesParam" -}}
{{- printf "\"%s\"" (toJson . | replace "\"" "\\\"") -}}
{{- end -}}

{{/* Env shared by every Ray container. Settings read TANDEM_* wherever they are loaded: the
     app builder (args override env, so secret-backed values come this way) and `tandem`
     commands run in a pod (`tandem status`, `tandem keys`), which find Redis here. */}}
{{- define "tandem.rayEnv" -}}
{{- if and (eq .Values.redis.mode "external") .Values.redis.external.existingSecret }}
- name: TANDEM_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.external.existingSecret }}
      key: {{ .Values.redis.external.existingSecretKey }}
{{- else if include "tandem.redisAuthEnabled" . }}
# The internal Redis's password, from its Secret; Kubernetes expands $(REDIS_AUTH_PASSWORD) in
# the URL below, so the password never appears in the RayService. (Not REDIS_PASSWORD: KubeRay
# sets that one on the head for GCS fault tolerance and refuses it in the pod template.)
- name: REDIS_AUTH_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "tandem.redisAuthSecretName" . }}
      key: {{ include "tandem.redisAuthSecretKey" . }}
- name: TANDEM_REDIS_URL
  value: {{ printf "redis://:$(REDIS_AUTH_PASSWORD)@%s:6379/0" (include "tandem.redisName" .) | quote }}
{{- else }}
- name: TANDEM_REDIS_URL
  value: {{ include "tandem.redisUrl" . | quote }}
{{- end }}
{{- if include "tandem.apiKeyEnabled" . }}
# The raw key from the Secret, wrapped into the JSON list that auth.api_keys reads.
- name: ENDPOINT_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "tandem.apiKeySecretName" . }}
      key: {{ if .Values.auth.existingSecret }}{{ .Values.auth.existingSecretKey }}{{ else }}api-key{{ end }}
- name: TANDEM_AUTH__API_KEYS
  value: '["$(ENDPOINT_API_KEY)"]'
{{- end }}
# Every KV request between workers is HMAC-authenticated with the cluster secret.
- name: TANDEM_KV_CONNECTOR__AUTH_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "tandem.kvSecretName" . }}
      key: {{ if .Values.auth.kvExistingSecret }}{{ .Values.auth.kvExistingSecretKey }}{{ else }}kv-secret{{ end }}
{{- if .Values.huggingface.tokenSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.huggingface.tokenSecret }}
      key: {{ .Values.huggingface.tokenSecretKey }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Volumes of every Ray pod: /dev/shm in memory (Ray's object store and vLLM use it). */}}
{{- define "tandem.rayVolumes" -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shmSize }}
{{- with .root.Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "tandem.rayVolumeMounts" -}}
- name: dshm
  mountPath: /dev/shm
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end -}}
