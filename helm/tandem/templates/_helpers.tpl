{{/* Names ------------------------------------------------------------------------------ */}}

{{- define "tandem.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The RayService's name and every object's prefix. At most 40 characters: KubeRay appends
     "-xxxxx" (the RayCluster) and "-head-svc" / "-serve-svc" to it and refuses RayService names
     over 47; the Redis StatefulSet's pods carry the label "<fullname>-redis-<10-char hash>",
     which must stay within 63. A DNS-1035 label: KubeRay (>= 1.4) refuses anything else as a
     RayService name, 1.3 silently rewrites a leading digit, and Service names must be one.
     Helm accepts release names that are not (`1st-llm`, `llm.v2`): fail here, at render time,
     rather than at the API server or in the operator's events. */}}
{{- define "tandem.fullname" -}}
{{- $name := "" -}}
{{- if .Values.fullnameOverride -}}
{{- if gt (len .Values.fullnameOverride) 40 -}}
{{- fail (printf "fullnameOverride %q is %d characters; at most 40 (KubeRay appends suffixes to the RayService name and Kubernetes limits names and labels to 63)" .Values.fullnameOverride (len .Values.fullnameOverride)) -}}
{{- end -}}
{{- $name = .Values.fullnameOverride -}}
{{- else if contains (include "tandem.name" .) .Release.Name -}}
{{- $name = .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name = printf "%s-%s" .Release.Name (include "tandem.name" .) | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) -}}
{{- fail (printf "the RayService name %q (from %s) is not a DNS-1035 label: lowercase letters, digits and '-', starting with a letter and ending with a letter or digit. KubeRay rejects such a RayService and Kubernetes such Service names; use another release name or set fullnameOverride" $name (ternary "fullnameOverride" (printf "the release name %q" .Release.Name) (not (empty .Values.fullnameOverride)))) -}}
{{- end -}}
{{- $name -}}
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

{{/* The ServiceAccount of the Ray pods; empty: the namespace's default. */}}
{{- define "tandem.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "tandem.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The image reference: repository@digest, else repository:tag (tag "" -> appVersion). The
     tag is a string (the schema refuses numbers, which YAML would have rounded: 1.10 -> 1.1). */}}
{{- define "tandem.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
{{- end -}}

{{/* Versions ---------------------------------------------------------------------------- */}}

{{/* "true" when the KubeRay operator (kubeRayVersion) is at least the version given. */}}
{{- define "tandem.kubeRayAtLeast" -}}
{{- if semverCompare (printf ">=%s-0" .min) .root.Values.kubeRayVersion -}}true{{- end -}}
{{- end -}}

{{/* Secrets ----------------------------------------------------------------------------- */}}

{{- define "tandem.apiKeyEnabled" -}}
{{- if or .Values.auth.existingSecret .Values.auth.apiKey (not .Values.auth.allowUnauthenticated) -}}
true
{{- end -}}
{{- end -}}

{{- define "tandem.apiKeySecretName" -}}
{{- .Values.auth.existingSecret | default (printf "%s-api-key" (include "tandem.fullname" .)) -}}
{{- end -}}

{{- define "tandem.apiKeySecretKey" -}}
{{- if .Values.auth.existingSecret -}}{{ .Values.auth.existingSecretKey }}{{- else -}}api-key{{- end -}}
{{- end -}}

{{- define "tandem.kvSecretName" -}}
{{- .Values.auth.kvExistingSecret | default (printf "%s-kv" (include "tandem.fullname" .)) -}}
{{- end -}}

{{- define "tandem.kvSecretKey" -}}
{{- if .Values.auth.kvExistingSecret -}}{{ .Values.auth.kvExistingSecretKey }}{{- else -}}kv-secret{{- end -}}
{{- end -}}

{{/* A value of a Secret the chart owns: the value given, else the one already in the cluster
     (so `helm upgrade` keeps a generated value), else a new random one, or a failure when
     generateSecrets is off. Args: root, name (Secret), key, value, setting (the value's
     path, for the message), existing (the existingSecret value's path), length. */}}
{{- define "tandem.secretValue" -}}
{{- $value := .value -}}
{{- if not $value -}}
{{- $found := lookup "v1" "Secret" .root.Release.Namespace .name -}}
{{- if and $found $found.data (hasKey $found.data .key) -}}
{{- $value = index $found.data .key | b64dec -}}
{{- end -}}
{{- end -}}
{{- if not $value -}}
{{- if not .root.Values.generateSecrets -}}
{{- fail (printf "generateSecrets is false and no %s is given: set %s (your Secret) or %s. Generated values change at every render without a cluster (helm template, Argo CD); see docs/deploy.md" .what .existing .setting) -}}
{{- end -}}
{{- $value = printf "%s%s" (.prefix | default "") (randAlphaNum (int .length)) -}}
{{- end -}}
{{- $value -}}
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

{{/* Ray ports ----------------------------------------------------------------------------- */}}

{{/* One of Ray's ports, from rayStartParams (Ray's own default otherwise): the container
     ports, KubeRay's Services and probes, and the NetworkPolicy all read it here. Args:
     params (a group's rayStartParams), key, default, where (for the message). */}}
{{- define "tandem.rayPort" -}}
{{- $value := index (.params | default dict) .key | default .default | toString -}}
{{- if not (regexMatch "^[0-9]{1,5}$" $value) -}}
{{- fail (printf "%s.rayStartParams.%s is %q: a port number" .where .key $value) -}}
{{- end -}}
{{- if or (lt (int $value) 1) (gt (int $value) 65535) -}}
{{- fail (printf "%s.rayStartParams.%s is %s: a port number (1-65535)" .where .key $value) -}}
{{- end -}}
{{- int $value -}}
{{- end -}}

{{- define "tandem.dashboardPort" -}}
{{- include "tandem.rayPort" (dict "params" .Values.head.rayStartParams "key" "dashboard-port" "default" 8265 "where" "head") -}}
{{- end -}}

{{- define "tandem.headMetricsPort" -}}
{{- include "tandem.rayPort" (dict "params" .Values.head.rayStartParams "key" "metrics-export-port" "default" 8080 "where" "head") -}}
{{- end -}}

{{/* Autoscaling and group sizes --------------------------------------------------------- */}}

{{/* "true" when KubeRay's in-tree Ray autoscaler runs: rayAutoscaler.enabled, or (null) as soon
     as one pool autoscales in Serve. */}}
{{- define "tandem.autoscale" -}}
{{- $on := false -}}
{{- range $role := splitList " " (include "tandem.roles" .) -}}
{{- if (index $.Values.tandem $role | default dict).autoscaling -}}{{- $on = true -}}{{- end -}}
{{- end -}}
{{- if include "tandem.planner" . -}}{{- $on = true -}}{{- end -}}
{{- if not (kindIs "invalid" .Values.rayAutoscaler.enabled) -}}{{- $on = .Values.rayAutoscaler.enabled -}}{{- end -}}
{{- if $on -}}true{{- end -}}
{{- end -}}

{{/* "true" when the P:D planner sizes the prefill and decode pools (tandem.planner.enabled). */}}
{{- define "tandem.planner" -}}
{{- if and ((.Values.tandem.planner | default dict).enabled) (eq (.Values.tandem.mode | default "disaggregated") "disaggregated") -}}true{{- end -}}
{{- end -}}

{{/* "true" when the Ray autoscaler runs as v2. */}}
{{- define "tandem.autoscalerV2" -}}
{{- if and (include "tandem.autoscale" .) (eq .Values.rayAutoscaler.version "v2") -}}true{{- end -}}
{{- end -}}

{{/* Pod count for an engine count: ceil(engines / enginesPerPod). Args: list engines perPod. */}}
{{- define "tandem.podsFor" -}}
{{- $engines := int (index . 0) -}}
{{- $perPod := int (index . 1) -}}
{{- div (add $engines (sub $perPod 1)) $perPod -}}
{{- end -}}

{{/* A worker group's engines and pods, as JSON {engines, minEngines, maxEngines, replicas,
     minReplicas, maxReplicas}, or a failure naming the values that contradict each other.
     Unset pod counts are derived from the engines (see values.yaml, workerGroups). Args:
     root, role. */}}
{{- define "tandem.groupSizes" -}}
{{- $root := .root -}}
{{- $role := .role -}}
{{- $group := index $root.Values.workerGroups $role -}}
{{- $pool := index $root.Values.tandem $role | default dict -}}
{{- $autoscale := include "tandem.autoscale" $root -}}
{{- $perPod := int $group.enginesPerPod -}}
{{- /* Engines, as TandemSettings reads them (its defaults where a value is unset; `default`
       would turn an explicit 0 into the default). */ -}}
{{- $engines := ternary (int $pool.replicas) 1 (hasKey $pool "replicas") -}}
{{- $minEngines := $engines -}}
{{- $maxEngines := $engines -}}
{{- $where := printf "tandem.%s.replicas" $role -}}
{{- $planner := .root.Values.tandem.planner | default dict -}}
{{- if and (include "tandem.planner" $root) (has $role (list "prefill" "decode")) -}}
{{- /* The planner's bounds (PlannerSettings' defaults: 1 .. 8 engines a phase). */ -}}
{{- $minKey := printf "min_%s" $role -}}
{{- $maxKey := printf "max_%s" $role -}}
{{- $minEngines = ternary (int (index $planner $minKey)) 1 (hasKey $planner $minKey) -}}
{{- $maxEngines = ternary (int (index $planner $maxKey)) 8 (hasKey $planner $maxKey) -}}
{{- $engines = min $maxEngines (max $minEngines $engines) -}}
{{- $where = printf "tandem.planner.min_%s/max_%s" $role $role -}}
{{- end -}}
{{- with $pool.autoscaling -}}
{{- $minEngines = ternary (int .min_replicas) 1 (hasKey . "min_replicas") -}}
{{- $maxEngines = ternary (int .max_replicas) 1 (hasKey . "max_replicas") -}}
{{- $engines = $minEngines -}}
{{- if not (kindIs "invalid" .initial_replicas) -}}{{- $engines = int .initial_replicas -}}{{- end -}}
{{- $where = printf "tandem.%s.autoscaling" $role -}}
{{- if gt $minEngines $maxEngines -}}
{{- fail (printf "tandem.%s.autoscaling: min_replicas %d is greater than max_replicas %d" $role $minEngines $maxEngines) -}}
{{- end -}}
{{- end -}}
{{- if lt $minEngines 1 -}}
{{- fail (printf "%s: Tandem needs at least one %s engine (min_replicas / replicas >= 1); the Serve app would fail to deploy" $where $role) -}}
{{- end -}}
{{- $podsEngines := int (include "tandem.podsFor" (list $engines $perPod)) -}}
{{- $hasReplicas := not (kindIs "invalid" $group.replicas) -}}
{{- $hasMin := not (kindIs "invalid" $group.minReplicas) -}}
{{- $hasMax := not (kindIs "invalid" $group.maxReplicas) -}}
{{- $replicas := $podsEngines -}}
{{- if $hasReplicas -}}
{{- $replicas = int $group.replicas -}}
{{- else -}}
{{- if and $hasMin (lt $replicas (int $group.minReplicas)) -}}{{- $replicas = int $group.minReplicas -}}{{- end -}}
{{- if and $hasMax (gt $replicas (int $group.maxReplicas)) -}}{{- $replicas = int $group.maxReplicas -}}{{- end -}}
{{- end -}}
{{- $minReplicas := $replicas -}}
{{- $maxReplicas := $replicas -}}
{{- if $autoscale -}}
{{- $minReplicas = min $replicas (int (include "tandem.podsFor" (list $minEngines $perPod))) -}}
{{- $maxReplicas = max $replicas (int (include "tandem.podsFor" (list $maxEngines $perPod))) -}}
{{- end -}}
{{- /* Explicit bounds win; a derived bound never contradicts an explicit one. */ -}}
{{- if $hasMin -}}{{- $minReplicas = int $group.minReplicas -}}{{- end -}}
{{- if $hasMax -}}{{- $maxReplicas = int $group.maxReplicas -}}{{- end -}}
{{- if and $hasMax (not $hasMin) -}}{{- $minReplicas = min $minReplicas $maxReplicas -}}{{- end -}}
{{- if and $hasMin (not $hasMax) -}}{{- $maxReplicas = max $maxReplicas $minReplicas -}}{{- end -}}
{{- $set := list -}}
{{- range $field := list "replicas" "minReplicas" "maxReplicas" -}}
{{- if not (kindIs "invalid" (index $group $field)) -}}{{- $set = append $set $field -}}{{- end -}}
{{- end -}}
{{- $origin := printf "%s set, the rest derived from %s and enginesPerPod %d" (join ", " $set | default "none") $where $perPod -}}
{{- if gt $minReplicas $maxReplicas -}}
{{- fail (printf "workerGroups.%s: minReplicas %d is greater than maxReplicas %d (%s): KubeRay rejects the RayService" $role $minReplicas $maxReplicas $origin) -}}
{{- end -}}
{{- if or (lt $replicas $minReplicas) (gt $replicas $maxReplicas) -}}
{{- fail (printf "workerGroups.%s: replicas %d is outside minReplicas %d .. maxReplicas %d (%s): KubeRay would silently run %d pods" $role $replicas $minReplicas $maxReplicas $origin (ternary $minReplicas $maxReplicas (lt $replicas $minReplicas))) -}}
{{- end -}}
{{- /* The pods must be able to host the engines Serve will ask for. */ -}}
{{- if $autoscale -}}
{{- if lt (mul $maxReplicas $perPod) $maxEngines -}}
{{- fail (printf "workerGroups.%s: maxReplicas %d x enginesPerPod %d hosts %d engines, but %s asks for up to %d; raise workerGroups.%s.maxReplicas" $role $maxReplicas $perPod (mul $maxReplicas $perPod) $where $maxEngines $role) -}}
{{- end -}}
{{- else if lt (mul $replicas $perPod) $engines -}}
{{- fail (printf "workerGroups.%s: replicas %d x enginesPerPod %d hosts %d engines, but %s asks for %d and the Ray autoscaler is off; raise workerGroups.%s.replicas or enable rayAutoscaler" $role $replicas $perPod (mul $replicas $perPod) $where $engines $role) -}}
{{- end -}}
{{- dict "engines" $engines "minEngines" $minEngines "maxEngines" $maxEngines "replicas" $replicas "minReplicas" $minReplicas "maxReplicas" $maxReplicas | toJson -}}
{{- end -}}

{{/* Checks ------------------------------------------------------------------------------ */}}

{{/* Fails when two entries of a list share a key: the RayService CRD declares env (by name)
     and volumeMounts (by mountPath) as list maps, so the API server refuses duplicates. Args:
     list, key, where. */}}
{{- define "tandem.checkUnique" -}}
{{- $seen := list -}}
{{- range .list -}}
{{- $value := index . $.key -}}
{{- if has $value $seen -}}
{{- fail (printf "%s: %s %q appears twice (the chart sets some itself; see values.yaml). The API server would refuse the RayService" $.where $.key $value) -}}
{{- end -}}
{{- $seen = append $seen $value -}}
{{- end -}}
{{- end -}}

{{/* Env var names in a list of EnvVars. */}}
{{- define "tandem.envNames" -}}
{{- range . }}{{ .name }} {{ end -}}
{{- end -}}

{{/* Checks the schema cannot express, failing the install with a clear message. The rules
     KubeRay's operator applies to a RayService (ray-operator/controllers/ray/utils/
     validation.go) that values can break are checked here too: the CRD accepts such a spec and
     the operator then only emits an InvalidRayServiceSpec event, with no cluster ever made. */}}
{{- define "tandem.validate" -}}
{{- $fullname := include "tandem.fullname" . -}}
{{- if not (include "tandem.kubeRayAtLeast" (dict "root" . "min" "1.3.0")) -}}
{{- fail (printf "kubeRayVersion %s: the chart needs the KubeRay operator 1.3.0 or newer (RayService ray.io/v1 with gcsFaultToleranceOptions)" .Values.kubeRayVersion) -}}
{{- end -}}
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
{{- if and .Values.auth.kvSecret (lt (len .Values.auth.kvSecret) 32) -}}
{{- fail "auth.kvSecret must be at least 32 characters (it keys the HMAC of every KV request)" -}}
{{- end -}}
{{- $autoscale := include "tandem.autoscale" . -}}
{{- $v2 := include "tandem.autoscalerV2" . -}}
{{- /* Env KubeRay reserves on the head: it sets them itself, and rejects them (GCS fault
       tolerance) or they conflict with the autoscaler fields the chart writes. */ -}}
{{- $headEnv := splitList " " (include "tandem.envNames" (concat .Values.extraEnv .Values.head.env)) -}}
{{- range $name := list "RAY_REDIS_ADDRESS" "REDIS_PASSWORD" "REDIS_USERNAME" "RAY_enable_autoscaler_v2" -}}
{{- if has $name $headEnv -}}
{{- fail (printf "%s in head.env or extraEnv: KubeRay rejects it or sets it itself; use gcsFaultTolerance (Redis address and password) or rayAutoscaler.version (autoscaler v2)" $name) -}}
{{- end -}}
{{- end -}}
{{- range $param := list "redis-password" "redis-username" -}}
{{- if hasKey $.Values.head.rayStartParams $param -}}
{{- fail (printf "head.rayStartParams.%s: KubeRay rejects it; use gcsFaultTolerance.redisPasswordSecret" $param) -}}
{{- end -}}
{{- end -}}
{{- range $group := list "head" "prefill" "decode" "colocated" -}}
{{- $params := ternary $.Values.head.rayStartParams (index $.Values.workerGroups $group | default dict).rayStartParams (eq $group "head") | default dict -}}
{{- if and (hasKey $params "labels") (include "tandem.kubeRayAtLeast" (dict "root" $ "min" "1.5.0")) -}}
{{- fail (printf "%s rayStartParams.labels: KubeRay (>= 1.5) rejects it in rayStartParams; use podLabels for Kubernetes labels" (ternary "head" (printf "workerGroups.%s" $group) (eq $group "head"))) -}}
{{- end -}}
{{- end -}}
{{- $drainGrace := int ((.Values.tandem.routing | default dict).drain_grace_s | default 60) -}}
{{- with .Values.head.terminationGracePeriodSeconds -}}
{{- if lt (int .) $drainGrace -}}
{{- fail (printf "head.terminationGracePeriodSeconds %d is shorter than tandem.routing.drain_grace_s %d: Kubernetes would kill the head during its preStop drain" (int .) $drainGrace) -}}
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
{{- if not (kindIs "invalid" $group.idleTimeoutSeconds) -}}
{{- if not $v2 -}}
{{- fail (printf "workerGroups.%s.idleTimeoutSeconds needs the Ray autoscaler v2 (rayAutoscaler.enabled and rayAutoscaler.version: v2): KubeRay >= 1.6 rejects a per-group idle timeout otherwise (InvalidRayServiceSpec) and older versions ignore it; rayAutoscaler.idleTimeoutSeconds applies to every group with either version" $role) -}}
{{- end -}}
{{- end -}}
{{- with $group.terminationGracePeriodSeconds -}}
{{- if lt (int .) (add $drainGrace 30) -}}
{{- fail (printf "workerGroups.%s.terminationGracePeriodSeconds %d is shorter than Serve's graceful shutdown of an engine (tandem.routing.drain_grace_s + 30 = %d): Kubernetes would kill engines with requests in flight" $role (int .) (add $drainGrace 30)) -}}
{{- end -}}
{{- end -}}
{{- $_ := include "tandem.groupSizes" (dict "root" $ "role" $role) -}}
{{- end -}}
{{- /* The upgrade strategy KubeRay accepts for this version (ValidateRayServiceSpec). */ -}}
{{- $upgrade := .Values.upgradeStrategy -}}
{{- if eq $upgrade.type "NewClusterWithIncrementalUpgrade" -}}
{{- if not (include "tandem.kubeRayAtLeast" (dict "root" . "min" "1.5.0")) -}}
{{- fail (printf "upgradeStrategy.type NewClusterWithIncrementalUpgrade needs KubeRay >= 1.5.0 (kubeRayVersion is %s)" .Values.kubeRayVersion) -}}
{{- end -}}
{{- if not $autoscale -}}
{{- fail "upgradeStrategy.type NewClusterWithIncrementalUpgrade needs the Ray autoscaler (rayAutoscaler.enabled): KubeRay rejects it otherwise" -}}
{{- end -}}
{{- $options := $upgrade.clusterUpgradeOptions | default dict -}}
{{- range $field := list "gatewayClassName" "stepSizePercent" "intervalSeconds" -}}
{{- if not (hasKey $options $field) -}}
{{- fail (printf "upgradeStrategy.type NewClusterWithIncrementalUpgrade needs upgradeStrategy.clusterUpgradeOptions.%s" $field) -}}
{{- end -}}
{{- end -}}
{{- if gt (int $options.stepSizePercent) (int ($options.maxSurgePercent | default 100)) -}}
{{- fail "upgradeStrategy.clusterUpgradeOptions: stepSizePercent must be <= maxSurgePercent (KubeRay rejects it otherwise)" -}}
{{- end -}}
{{- else if $upgrade.clusterUpgradeOptions -}}
{{- fail "upgradeStrategy.clusterUpgradeOptions is only read with upgradeStrategy.type NewClusterWithIncrementalUpgrade" -}}
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
{{- if include "tandem.planner" . -}}
{{- /* The P:D planner, as Serve's application-level autoscaling policy (control_plane/app.py:
       planner_policy builds the same for `tandem up`). */ -}}
{{- $kwargs := dict "planner" $args.planner "app_name" ($args.app_name | default "tandem") "redis_url" ($args.redis_url | default "") -}}
{{- $_ := set $app "autoscaling_policy" (dict "policy_function" "control_plane.planner.serve_policy:PlannerPolicy" "policy_kwargs" $kwargs) -}}
{{- end -}}
{{- $config := dict "proxy_location" "EveryNode" "http_options" (dict "host" "0.0.0.0" "port" (int .Values.serve.port)) "applications" (list $app) -}}
{{- toYaml $config -}}
{{- end -}}

{{/* Pods -------------------------------------------------------------------------------- */}}

{{/* Ray's custom resources as rayStartParams wants them: a JSON object, itself quoted. */}}
{{- define "tandem.rayResourcesParam" -}}
{{- printf "\"%s\"" (toJson . | replace "\"" "\\\"") -}}
{{- end -}}

{{/* A group's value, or the shared one when the group's is null, as JSON {"v": value} (fromJson
     reads objects only). Args: group, key, shared. */}}
{{- define "tandem.inherit" -}}
{{- $own := index .group .key -}}
{{- toJson (dict "v" (ternary .shared $own (kindIs "invalid" $own))) -}}
{{- end -}}

{{/* The startup probe of a Ray container: the group's own, else the chart's, on the Ray node's
     health endpoint (the dashboard agent; the path KubeRay's own probes use for rayVersion).
     Args: root, group. Returns JSON ({} : none). */}}
{{- define "tandem.startupProbe" -}}
{{- $root := .root -}}
{{- if .group.startupProbe -}}
{{- toJson .group.startupProbe -}}
{{- else if $root.Values.rayStartupProbe.enabled -}}
{{- $settings := $root.Values.rayStartupProbe -}}
{{- $port := include "tandem.rayPort" (dict "params" .group.rayStartParams "key" "dashboard-agent-listen-port" "default" 52365 "where" .where) -}}
{{- $probe := dict "periodSeconds" (int $settings.periodSeconds) "failureThreshold" (int $settings.failureThreshold) "timeoutSeconds" (int $settings.timeoutSeconds) -}}
{{- /* As KubeRay's own probes (common/pod.go): Ray >= 2.53 serves one HTTP health endpoint;
       before, the raylet's health through the agent, with wget in the image. */ -}}
{{- if semverCompare ">=2.53.0-0" $root.Values.rayVersion -}}
{{- $_ := set $probe "httpGet" (dict "path" "/api/healthz" "port" (int $port)) -}}
{{- else -}}
{{- $command := printf "wget --tries 1 -T %d -q -O- http://localhost:%d/api/local_raylet_healthz | grep success" (int $settings.timeoutSeconds) (int $port) -}}
{{- $_ := set $probe "exec" (dict "command" (list "bash" "-c" $command)) -}}
{{- end -}}
{{- toJson $probe -}}
{{- else -}}
{}
{{- end -}}
{{- end -}}

{{/* Pod-level fields shared by the head and the worker groups, as YAML at the pod spec's level.
     Args: root, group (head or a workerGroups entry), component, gpu (bool),
     terminationGracePeriodSeconds. */}}
{{- define "tandem.rayPodSpec" -}}
{{- $root := .root -}}
{{- $group := .group -}}
{{- $labels := merge (include "tandem.selectorLabels" $root | fromYaml) (dict "app.kubernetes.io/component" .component) -}}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with include "tandem.serviceAccountName" $root }}
serviceAccountName: {{ . }}
{{- end }}
{{- with (include "tandem.inherit" (dict "group" $group "key" "priorityClassName" "shared" $root.Values.priorityClassName) | fromJson).v }}
priorityClassName: {{ . }}
{{- end }}
{{- $runtimeClass := ternary $root.Values.gpu.runtimeClassName "" .gpu }}
{{- with (include "tandem.inherit" (dict "group" $group "key" "runtimeClassName" "shared" $runtimeClass) | fromJson).v }}
runtimeClassName: {{ . }}
{{- end }}
{{- with (include "tandem.inherit" (dict "group" $group "key" "podSecurityContext" "shared" $root.Values.podSecurityContext) | fromJson).v }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- if include "tandem.autoscalerV2" $root }}
# Ray's autoscaler v2 replaces failed pods itself and requires that Kubernetes does not
# restart their containers.
restartPolicy: Never
{{- end }}
terminationGracePeriodSeconds: {{ .terminationGracePeriodSeconds }}
{{- with $group.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- $tolerations := $group.tolerations | default list }}
{{- if .gpu }}
{{- range $root.Values.gpu.tolerations }}
{{- if not (has . $tolerations) }}{{ $tolerations = append $tolerations . }}{{ end }}
{{- end }}
{{- end }}
{{- with $tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $group.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $group.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- range . }}
  {{- $constraint := deepCopy . }}
  {{- if not (hasKey $constraint "labelSelector") }}
  {{- $_ := set $constraint "labelSelector" (dict "matchLabels" $labels) }}
  {{- end }}
  - {{- toYaml $constraint | nindent 4 }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* The Ray container's securityContext: the group's (or the shared one), plus IPC_LOCK for
     RDMA memory registration. Args: root, group. Returns JSON. */}}
{{- define "tandem.rayContainerSecurityContext" -}}
{{- $context := (include "tandem.inherit" (dict "group" .group "key" "containerSecurityContext" "shared" .root.Values.containerSecurityContext) | fromJson).v | default dict -}}
{{- if .group.rdmaResources -}}
{{- $capabilities := $context.capabilities | default dict -}}
{{- $add := $capabilities.add | default list -}}
{{- if not (has "IPC_LOCK" $add) -}}{{- $add = append $add "IPC_LOCK" -}}{{- end -}}
{{- $_ := set $capabilities "add" $add -}}
{{- $_ := set $context "capabilities" $capabilities -}}
{{- end -}}
{{- toJson $context -}}
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
      key: {{ include "tandem.apiKeySecretKey" . }}
- name: TANDEM_AUTH__API_KEYS
  value: '["$(ENDPOINT_API_KEY)"]'
{{- end }}
# Every KV request between workers is HMAC-authenticated with the cluster secret.
- name: TANDEM_KV_CONNECTOR__AUTH_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "tandem.kvSecretName" . }}
      key: {{ include "tandem.kvSecretKey" . }}
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
