{{/*
Names: at most 63 characters (DNS-1123 labels), no trailing dash.
*/}}
{{- define "saige.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "saige.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
"<fullname>-<suffix>", the full name cut so that the whole stays within 63 characters.
Usage: include "saige.suffixed" (list . "db")
*/}}
{{- define "saige.suffixed" -}}
{{- $root := index . 0 }}
{{- $suffix := index . 1 }}
{{- $max := sub 62 (len $suffix) | int }}
{{- printf "%s-%s" (include "saige.fullname" $root | trunc $max | trimSuffix "-") $suffix }}
{{- end }}

{{- define "saige.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "saige.selectorLabels" -}}
app.kubernetes.io/name: {{ include "saige.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "saige.labels" -}}
helm.sh/chart: {{ include "saige.chart" . }}
{{ include "saige.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: saige
{{- end }}

{{- define "saige.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "saige.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "saige.claimName" -}}
{{- if .Values.persistence.existingClaim }}
{{- .Values.persistence.existingClaim }}
{{- else }}
{{- include "saige.suffixed" (list . "data") }}
{{- end }}
{{- end }}

{{- define "saige.configMapName" -}}
{{- include "saige.suffixed" (list . "pipeline") }}
{{- end }}

{{/* The Secret the chart creates for database.url (quick demos). */}}
{{- define "saige.dbSecretName" -}}
{{- include "saige.suffixed" (list . "db") }}
{{- end }}

{{/*
An image reference: repository@digest when a digest is given, else repository:tag
(tag default: the chart's appVersion). Usage: include "saige.image" (list . .Values.image.extract)
*/}}
{{- define "saige.image" -}}
{{- $root := index . 0 }}
{{- $image := index . 1 }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{/*
Fails the render when a database URL or path would carry a credential into a ConfigMap: a
userinfo password; a query key or connection-string keyword naming one (password, passfile,
sslkey, sslpassword, pwd, tokens, odbc_connect; "dbname=x password=y" too); percent-escaped
letters or digits, which could spell one; a control character; or a URL that cannot be read
(a bad port). The messages never show the value.
Usage: include "saige.refuseCredentials" (list "pipeline.source.url" $url)
*/}}
{{- define "saige.refuseCredentials" -}}
{{- $where := index . 0 }}
{{- $url := index . 1 }}
{{- $fix := "it would be stored in a ConfigMap. Put the URL in a Secret and set database.existingSecret instead" }}
{{- if and $url (not (kindIs "string" $url)) }}
{{- fail (printf "%s must be a string" $where) }}
{{- else if $url }}
{{- if regexMatch `[\x00-\x1f\x7f]` $url }}
{{- fail (printf "%s contains a line break or control character (value not shown): %s" $where $fix) }}
{{- end }}
{{- if contains "://" $url }}
{{- if not (regexMatch `^[A-Za-z0-9_+]+://` $url) }}
{{- fail (printf "%s is not a valid database URL (value not shown): %s" $where $fix) }}
{{- end }}
{{- if regexMatch `^[A-Za-z0-9_+]+://[^:/]*:[^@]+@` $url }}
{{- fail (printf "%s holds a password: %s" $where $fix) }}
{{- end }}
{{- $authority := regexFind `^[^/?]*` (regexReplaceAll `^[A-Za-z0-9_+]+://` $url "") }}
{{- $hostPort := regexReplaceAll `^\[[^\]]*\]` (regexReplaceAll `^.*@` $authority "") "" }}
{{- if and (contains ":" $hostPort) (not (regexMatch `^[^:]*:[0-9]*$` $hostPort)) }}
{{- fail (printf "%s is not a valid database URL (its port is not a number; value not shown): %s" $where $fix) }}
{{- end }}
{{- end }}
{{- if regexMatch `(?i)(pass|pwd|secret|token|key|credential|odbc_connect)[\w.%-]*(\s|%20|\+)*(=|%3d)` $url }}
{{- fail (printf "%s carries a credential (a password, passfile, sslkey or sslpassword parameter or keyword): %s" $where $fix) }}
{{- end }}
{{- if regexMatch `%(3[0-9]|[46][1-9a-fA-F]|[57][0-9aA]|5[fF])` $url }}
{{- fail (printf "%s has percent-escaped letters or digits, which could hide a credential: %s" $where $fix) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The pipeline spec: the values' pipeline block, with the kubernetes block composed from the
chart's values. Rendered with toYaml into the ConfigMap.
*/}}
{{- define "saige.pipelineSpec" -}}
{{- if and .Values.database.url .Values.database.existingSecret }}
{{- fail "set database.existingSecret or database.url, not both" }}
{{- end }}
{{- $pipeline := deepCopy (.Values.pipeline | default dict) }}
{{- $source := get $pipeline "source" | default dict }}
{{- include "saige.refuseCredentials" (list "pipeline.source.url" $source.url) }}
{{- $k8s := get $pipeline "kubernetes" | default dict }}
{{- $images := dict "extract" (include "saige.image" (list . .Values.image.extract)) "train" (include "saige.image" (list . .Values.image.train)) "pull_policy" .Values.image.pullPolicy "pull_secrets" .Values.imagePullSecrets }}
{{- $_ := set $k8s "images" $images }}
{{- $_ := set $k8s "namespace" .Release.Namespace }}
{{- $_ := set $k8s "claim_name" (include "saige.claimName" .) }}
{{- $_ := set $k8s "controller_service_account" (include "saige.serviceAccountName" .) }}
{{- $_ := set $k8s "run_as_user" .Values.podSecurityContext.runAsUser }}
{{- $secrets := dict }}
{{- if .Values.database.existingSecret }}
{{- $_ := set $secrets "db_url" (dict "name" .Values.database.existingSecret "key" .Values.database.secretKey) }}
{{- else if .Values.database.url }}
{{- $_ := set $secrets "db_url" (dict "name" (include "saige.dbSecretName" .) "key" "url") }}
{{- end }}
{{- if .Values.huggingface.existingSecret }}
{{- $_ := set $secrets "hf_token" (dict "name" .Values.huggingface.existingSecret "key" .Values.huggingface.secretKey) }}
{{- end }}
{{- $_ := set $k8s "secrets" $secrets }}
{{- if .Values.metrics.pushgateway.url }}
{{- $_ := set $k8s "pushgateway_url" .Values.metrics.pushgateway.url }}
{{- end }}
{{- $_ := set $pipeline "kubernetes" $k8s }}
{{- toYaml $pipeline }}
{{- end }}

{{/*
The container security context of the chart's pods: securityContext, with the pod's user and
group (podSecurityContext) repeated, as the step pods have them.
*/}}
{{- define "saige.containerSecurityContext" -}}
{{- $pod := pick .Values.podSecurityContext "runAsNonRoot" "runAsUser" "runAsGroup" }}
{{- toYaml (merge (deepCopy .Values.securityContext) $pod) }}
{{- end }}

{{/*
The pod spec of both pods the chart runs itself, the CronJob's controller and the `helm test`
pod: one image, one hardening, the spec and /tmp mounted, placed by controller.*; they differ
in what they run, whether they reach the API server, their resources and their /tmp size.
Usage: include "saige.podSpec" (dict "root" . "container" "controller" "command" (list …)
  "args" (list …) "api" true "env" (list …) "resources" .Values.controller.resources "tmpSize" "256Mi")
*/}}
{{- define "saige.podSpec" -}}
{{- $root := .root }}
{{- $values := $root.Values -}}
restartPolicy: Never
{{- if .api }}
serviceAccountName: {{ include "saige.serviceAccountName" $root }}
# The controller talks to the API server (its Role: jobs, pods, pods/log); the
# ServiceAccount mounts no token by default, so this pod opts in.
automountServiceAccountToken: true
{{- else }}
automountServiceAccountToken: false
{{- end }}
enableServiceLinks: false
{{- with $values.imagePullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
securityContext:
  {{- toYaml $values.podSecurityContext | nindent 2 }}
containers:
  - name: {{ .container }}
    image: {{ include "saige.image" (list $root $values.image.extract) | quote }}
    imagePullPolicy: {{ $values.image.pullPolicy }}
    command: {{ toJson .command }}
    {{- with .args }}
    args: {{ toJson . }}
    {{- end }}
    env:
      - name: HOME
        value: /tmp
      {{- with .env }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    securityContext:
      {{- include "saige.containerSecurityContext" $root | nindent 6 }}
    {{- with .resources }}
    resources:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    terminationMessagePolicy: FallbackToLogsOnError
    volumeMounts:
      - name: spec
        mountPath: /etc/saige
        readOnly: true
      - name: tmp
        mountPath: /tmp
volumes:
  - name: spec
    configMap:
      name: {{ include "saige.configMapName" $root }}
  - name: tmp
    emptyDir:
      sizeLimit: {{ .tmpSize }}
{{- with $values.controller.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.controller.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.controller.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
