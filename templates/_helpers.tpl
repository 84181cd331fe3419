{{/* The ChatPlatform's name: its children are <name>-protocol and <name>-worker. */}}
{{- define "parley.name" -}}
{{- $n := .Values.platformName | default .Release.Name -}}
{{- if gt (len $n) 40 -}}
{{- fail (printf "platform name %q is longer than 40 characters (its pods' names would not fit 63): set platformName" $n) -}}
{{- end -}}
{{- $n -}}
{{- end -}}

{{- define "parley.labels" -}}
app.kubernetes.io/part-of: parley
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Labels the operator puts on the platform's pods (operator/parley_operator/resources.py). */}}
{{- define "parley.podSelector" -}}
app.kubernetes.io/name: parley
app.kubernetes.io/instance: {{ include "parley.name" . }}
{{- end -}}

{{- define "parley.image" -}}
{{- $i := .Values.global.image -}}
{{- if $i.digest -}}{{ printf "%s@%s" $i.repository $i.digest }}{{- else -}}{{ printf "%s:%s" $i.repository ($i.tag | default .Chart.AppVersion) }}{{- end -}}
{{- end -}}

{{- define "parley.appSecretName" -}}
{{- .Values.database.existingSecret | default (printf "%s-app" .Release.Name) -}}
{{- end -}}

{{- define "parley.redisSecretName" -}}
{{- if and (not .Values.redis.enabled) .Values.externalRedis.existingSecret -}}
{{- .Values.externalRedis.existingSecret -}}
{{- else -}}
{{- printf "%s-redis" .Release.Name -}}
{{- end -}}
{{- end -}}

{{- define "parley.redisSecretKey" -}}
{{- if and (not .Values.redis.enabled) .Values.externalRedis.existingSecret -}}{{ .Values.externalRedis.existingSecretKey }}{{- else -}}urls{{- end -}}
{{- end -}}

{{/* Host names: explicit, else the ingress/gateway hosts plus loopback names for port-forward. */}}
{{- define "parley.allowedHosts" -}}
{{- $hosts := list -}}
{{- if .Values.allowedHosts -}}
{{- $hosts = .Values.allowedHosts -}}
{{- else -}}
{{- if .Values.ingress.enabled -}}{{- $hosts = append $hosts .Values.ingress.host -}}{{- end -}}
{{- if .Values.gateway.enabled -}}
{{- range (.Values.gateway.hostnames | default (list .Values.ingress.host)) -}}{{- if not (has . $hosts) -}}{{- $hosts = append $hosts . -}}{{- end -}}{{- end -}}
{{- end -}}
{{- $hosts = concat $hosts (list "localhost" "127.0.0.1") -}}
{{- end -}}
{{- toJson $hosts -}}
{{- end -}}

{{/* The Host header the helm test sends: the first allowed host that is not a wildcard. */}}
{{- define "parley.testHost" -}}
{{- $host := "localhost" -}}
{{- range (include "parley.allowedHosts" . | fromJsonArray) -}}{{- if and (eq $host "localhost") (not (contains "*" .)) (not (hasPrefix "." .)) -}}{{- $host = . -}}{{- end -}}{{- end -}}
{{- $host -}}
{{- end -}}

{{- define "parley.checks" -}}
{{- if and (not .Values.postgresql.enabled) (not .Values.database.url) (not .Values.database.existingSecret) -}}
{{- fail "postgresql.enabled=false needs database.url or database.existingSecret" -}}
{{- end -}}
{{- if and (not .Values.redis.enabled) (not .Values.externalRedis.urls) (not .Values.externalRedis.existingSecret) -}}
{{- fail "redis.enabled=false needs externalRedis.urls or externalRedis.existingSecret" -}}
{{- end -}}
{{- if gt (int .Values.protocol.minReplicas) (int .Values.protocol.maxReplicas) -}}
{{- fail "protocol.minReplicas must not exceed protocol.maxReplicas" -}}
{{- end -}}
{{- if gt (int .Values.worker.minReplicas) (int .Values.worker.maxReplicas) -}}
{{- fail "worker.minReplicas must not exceed worker.maxReplicas" -}}
{{- end -}}
{{- if and (has "*" .Values.allowedHosts) (not .Values.allowedOrigins) -}}
{{- fail "allowedOrigins is required when allowedHosts contains \"*\" (origins are never derived from a wildcard)" -}}
{{- end -}}
{{- end -}}

{{/* Pod-level pieces shared by the chart's own Parley pods (migration Job, helm test). */}}
{{- define "parley.podSecurity" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.global.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
automountServiceAccountToken: false
volumes:
  - name: tmp
    emptyDir: {sizeLimit: 64Mi}
{{- end -}}

{{/* A credential kept across upgrades: the live Secret's value, else a fresh one. */}}
{{- define "parley.keep" -}}
{{- $old := lookup "v1" "Secret" .ns .name -}}
{{- if and $old $old.data (index $old.data .key) -}}{{ index $old.data .key | b64dec }}{{- else -}}{{ .fresh }}{{- end -}}
{{- end -}}
