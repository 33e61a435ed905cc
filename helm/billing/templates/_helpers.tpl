{{- define "billing.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "billing.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "billing.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end -}}

{{- define "billing.secretName" -}}
{{ include "billing.fullname" . }}
{{- end -}}

{{- define "billing.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{ default (include "billing.fullname" .) .Values.serviceAccount.name }}
{{- else -}}
{{ default "default" .Values.serviceAccount.name }}
{{- end -}}
{{- end -}}

{{- define "billing.image" -}}
"{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}"
{{- end -}}

{{/* Non-root, read-only root filesystem, no privileges: for every container. */}}
{{- define "billing.containerSecurity" -}}
runAsNonRoot: true
runAsUser: 65534
runAsGroup: 65534
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The environment every billing container reads: the ConfigMap, the
     chart's Secret, and the existing Secrets named in the values. */}}
{{- define "billing.env" -}}
envFrom:
  - configMapRef:
      name: {{ include "billing.fullname" . }}
  - secretRef:
      name: {{ include "billing.secretName" . }}
{{- if or .Values.database.existingSecret .Values.jwt.existingSecret }}
env:
  {{- with .Values.database.existingSecret }}
  - name: DATABASE_URL
    valueFrom:
      secretKeyRef: { name: {{ . }}, key: DATABASE_URL }
  - name: DATABASE_READ_URL
    valueFrom:
      secretKeyRef: { name: {{ . }}, key: DATABASE_READ_URL, optional: true }
  {{- end }}
  {{- with .Values.jwt.existingSecret }}
  - name: BILLING_JWT_SECRET
    valueFrom:
      secretKeyRef: { name: {{ . }}, key: BILLING_JWT_SECRET }
  {{- end }}
{{- end }}
{{- end -}}
