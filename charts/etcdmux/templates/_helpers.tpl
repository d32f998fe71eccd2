{{- define "etcdmux.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "etcdmux.fullname" -}}
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

{{- define "etcdmux.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "etcdmux.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "etcdmux.selectorLabels" -}}
app.kubernetes.io/name: {{ include "etcdmux.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "etcdmux.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "etcdmux.mode" -}}
{{- if not (has .Values.mode (list "standalone" "sidecar")) }}
{{- fail (printf "mode must be standalone or sidecar, not %q" .Values.mode) }}
{{- end }}
{{- .Values.mode }}
{{- end }}

{{- define "etcdmux.listenAddress" -}}
{{- if .Values.listenAddress }}{{ .Values.listenAddress }}
{{- else if eq .Values.mode "sidecar" }}127.0.0.1
{{- else }}0.0.0.0
{{- end }}
{{- end }}

{{- define "etcdmux.upstreamSecret" -}}
{{- default (printf "%s-etcd-client" (include "etcdmux.fullname" .)) .Values.tls.upstream.secretName }}
{{- end }}
{{- define "etcdmux.listenerSecret" -}}
{{- default (printf "%s-server-tls" (include "etcdmux.fullname" .)) .Values.tls.listener.secretName }}
{{- end }}
{{- define "etcdmux.clientCASecret" -}}
{{- default (include "etcdmux.listenerSecret" .) .Values.tls.listener.clientCA.secretName }}
{{- end }}

{{- define "etcdmux.scheme" -}}
{{- if .Values.tls.listener.enabled }}https{{ else }}http{{ end }}
{{- end }}

{{/* Seconds: must exceed server.shutdown_grace_ms. */}}
{{- define "etcdmux.terminationGrace" -}}
{{- $graceMs := int64 (default 10000 .Values.config.server.shutdown_grace_ms) }}
{{- $min := add1 (div $graceMs 1000) }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add (div (add $graceMs 999) 1000) 5 }}
{{- else if lt (int64 .Values.terminationGracePeriodSeconds) $min }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed config.server.shutdown_grace_ms (%v ms)" .Values.terminationGracePeriodSeconds $graceMs) }}
{{- else }}
{{- int64 .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/* `key = value` lines of a flat map (nulls and empty lists left out). */}}
{{- define "etcdmux.tomlTable" -}}
{{- range $k, $v := . }}
{{- if kindIs "invalid" $v }}
{{- else if kindIs "map" $v }}
{{- fail (printf "config: %s is a table; set it through config.extra" $k) }}
{{- else if kindIs "slice" $v }}
{{- if $v }}
{{ $k }} = {{ toJson $v }}
{{- end }}
{{- else }}
{{ $k }} = {{ toJson $v }}
{{- end }}
{{- end }}
{{- end }}

{{/* Secret files: group-readable when the pod's fsGroup makes uid 65532's group own
them (standalone), else world-readable (a sidecar in a pod without that fsGroup). */}}
{{- define "etcdmux.secretMode" -}}
{{- if and (eq .Values.mode "standalone") .Values.podSecurityContext.fsGroup }}0440{{ else }}0444{{ end }}
{{- end }}

{{/* Volumes for the TLS Secrets (used by the Deployment and the sidecar snippet). */}}
{{- define "etcdmux.tlsVolumes" -}}
{{- if .Values.tls.upstream.enabled }}
- name: upstream-tls
  secret:
    secretName: {{ include "etcdmux.upstreamSecret" . }}
    defaultMode: {{ include "etcdmux.secretMode" . }}
{{- end }}
{{- if .Values.tls.listener.enabled }}
- name: listener-tls
  secret:
    secretName: {{ include "etcdmux.listenerSecret" . }}
    defaultMode: {{ include "etcdmux.secretMode" . }}
{{- if .Values.tls.listener.clientCA.enabled }}
- name: client-ca
  secret:
    secretName: {{ include "etcdmux.clientCASecret" . }}
    defaultMode: {{ include "etcdmux.secretMode" . }}
{{- end }}
{{- end }}
{{- end }}

{{- define "etcdmux.tlsVolumeMounts" -}}
{{- if .Values.tls.upstream.enabled }}
- name: upstream-tls
  mountPath: /etc/etcdmux/tls/upstream
  readOnly: true
{{- end }}
{{- if .Values.tls.listener.enabled }}
- name: listener-tls
  mountPath: /etc/etcdmux/tls/listener
  readOnly: true
{{- if .Values.tls.listener.clientCA.enabled }}
- name: client-ca
  mountPath: /etc/etcdmux/tls/client-ca
  readOnly: true
{{- end }}
{{- end }}
{{- end }}

{{- define "etcdmux.tlsUpstreamCheck" -}}
{{- $https := false }}
{{- range .Values.config.upstream.endpoints }}{{ if hasPrefix "https://" . }}{{ $https = true }}{{ end }}{{ end }}
{{- if and .Values.tls.upstream.enabled (not $https) }}
{{- fail "tls.upstream.enabled needs https:// endpoints in config.upstream.endpoints" }}
{{- end }}
{{- if and $https (not .Values.tls.upstream.enabled) }}
{{- fail "https:// upstream endpoints need tls.upstream.enabled (a Secret with ca.crt)" }}
{{- end }}
{{- if and .Values.config.tenancy.identity (not .Values.tls.listener.clientCA.enabled) }}
{{- fail "config.tenancy.identity needs tls.listener.enabled and tls.listener.clientCA.enabled" }}
{{- end }}
{{- if and .Values.tls.listener.clientCA.enabled (not .Values.tls.listener.enabled) }}
{{- fail "tls.listener.clientCA.enabled needs tls.listener.enabled" }}
{{- end }}
{{- end }}

{{/* The container to add to Milo's apiserver pod in sidecar mode. */}}
{{- define "etcdmux.sidecarContainer" -}}
- name: etcdmux
  image: {{ include "etcdmux.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  # Native sidecar (Kubernetes >= 1.29, under initContainers): starts before the
  # apiserver and stops after it. Under containers, leave this line out.
  restartPolicy: Always
  args: ["--config", "/etc/etcdmux/etcdmux.toml"]
  env:
    - name: RUST_LOG
      value: {{ .Values.logLevel | quote }}
  ports:
    - name: etcdmux-metrics
      containerPort: {{ .Values.ports.metrics }}
  livenessProbe:
    httpGet: { path: /livez, port: {{ .Values.ports.metrics }} }
    periodSeconds: 10
    failureThreshold: 3
  readinessProbe:
    httpGet: { path: /readyz, port: {{ .Values.ports.metrics }} }
    periodSeconds: 2
    failureThreshold: 2
  resources:
    {{- toYaml .Values.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: etcdmux-config
      mountPath: /etc/etcdmux/etcdmux.toml
      subPath: etcdmux.toml
      readOnly: true
    {{- with include "etcdmux.tlsVolumeMounts" . | trim }}{{ . | nindent 4 }}{{ end }}
# pod volumes:
# - name: etcdmux-config
#   configMap: { name: {{ include "etcdmux.fullname" . }} }
{{- with include "etcdmux.tlsVolumes" . | trim }}
{{- . | nindent 0 | replace "\n" "\n# " }}
{{- end }}
# apiserver: --etcd-servers={{ include "etcdmux.scheme" . }}://127.0.0.1:{{ .Values.ports.grpc }}
{{- if .Values.config.staticTenant }}  --etcd-compaction-interval=0{{ end }}
# and the pod's terminationGracePeriodSeconds >= {{ include "etcdmux.terminationGrace" . }}
{{- end }}

{{- define "etcdmux.listenerTls" -}}
{{- if .Values.tls.listener.enabled }}
cert_file = "/etc/etcdmux/tls/listener/tls.crt"
key_file = "/etc/etcdmux/tls/listener/tls.key"
{{- if .Values.tls.listener.clientCA.enabled }}
trusted_ca_file = "/etc/etcdmux/tls/client-ca/ca.crt"
client_cert_auth = true
{{- end }}
{{- end }}
{{- end }}
