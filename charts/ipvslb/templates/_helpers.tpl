{{/* The chart's name, or nameOverride. */}}
{{- define "ipvslb.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The prefix of every object's name: fullnameOverride, else the release (and chart) name. */}}
{{- define "ipvslb.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels of every object. */}}
{{- define "ipvslb.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "ipvslb.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component (pass a dict with "root" and "component"). */}}
{{- define "ipvslb.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ipvslb.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The image reference: repository, then the digest, else the tag (default: appVersion). */}}
{{- define "ipvslb.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Names of the ServiceAccounts. */}}
{{- define "ipvslb.allocatorName" -}}
{{- printf "%s-allocator" (include "ipvslb.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- define "ipvslb.directorName" -}}
{{- printf "%s-director" (include "ipvslb.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- define "ipvslb.externalDirectorName" -}}
{{- printf "%s-external-director" (include "ipvslb.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The environment both roles share. */}}
{{- define "ipvslb.commonEnv" -}}
- name: IPVSLB_LOAD_BALANCER_CLASS
  value: {{ .Values.loadBalancerClass | quote }}
- name: IPVSLB_UNCLASSED_SERVICES
  value: {{ .Values.unclassedServices | quote }}
- name: IPVSLB_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
- name: IPVSLB_METRICS_ADDR
  value: {{ printf "0.0.0.0:%d" (int .Values.metrics.port) | quote }}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- end -}}

{{/* Probes on the metrics port. */}}
{{- define "ipvslb.probes" -}}
livenessProbe:
  httpGet:
    path: /healthz
    port: metrics
  periodSeconds: 10
  timeoutSeconds: 3
  failureThreshold: 3
readinessProbe:
  httpGet:
    path: /readyz
    port: metrics
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 2
startupProbe:
  httpGet:
    path: /healthz
    port: metrics
  periodSeconds: 2
  failureThreshold: 30
{{- end -}}

{{/* imagePullSecrets, from names or {name: ...} objects (empty without any). */}}
{{- define "ipvslb.pullSecrets" -}}
{{- if .Values.imagePullSecrets -}}
imagePullSecrets:
{{- range .Values.imagePullSecrets }}
  - name: {{ if kindIs "string" . }}{{ . }}{{ else }}{{ .name }}{{ end }}
{{- end }}
{{- end -}}
{{- end -}}
