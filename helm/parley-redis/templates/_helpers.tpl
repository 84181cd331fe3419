{{- define "parley-redis.fullname" -}}
{{- printf "%s-redis" .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}

{{- define "parley-redis.selectorLabels" -}}
app.kubernetes.io/name: parley-redis
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: redis
{{- end -}}

{{- define "parley-redis.labels" -}}
{{ include "parley-redis.selectorLabels" . }}
app.kubernetes.io/part-of: parley
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "parley-redis.secretName" -}}
{{- if .Values.auth.existingSecret -}}{{ tpl .Values.auth.existingSecret . }}{{- else -}}{{ include "parley-redis.fullname" . }}{{- end -}}
{{- end -}}

{{- define "parley-redis.image" -}}
{{- if .Values.image.digest -}}{{ printf "%s@%s" .Values.image.repository .Values.image.digest }}{{- else -}}{{ printf "%s:%s" .Values.image.repository .Values.image.tag }}{{- end -}}
{{- end -}}
