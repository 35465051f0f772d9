"""The only module that calls the Kubernetes API.

Every call goes through :meth:`Cluster._call`, which retries what a retry can fix (429,
5xx, dropped connections, with backoff) and turns what it cannot into one clear error:
no kubeconfig, forbidden (naming the verb and resource the Role lacks), unknown namespace.
Watches list first, then watch from the list's resourceVersion, and re-list when the
server says the version is gone (410) or the stream ends, as a real API server requires.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import urllib3
import yaml
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from kubernetes.config import kube_config
from kubernetes.config.config_exception import ConfigException
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from saige_k8s.errors import ConfigError, RuntimeFailure

log = logging.getLogger(__name__)

T = TypeVar("T")

IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
#: Set by the Job controller on every pod it creates.
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})
#: A watch is re-opened this often even when nothing happens (a real server may drop it sooner).
WATCH_SECONDS = 300
#: Seconds to wait for a connection, and for an answer (a watch and a followed log wait longer).
CONNECT_TIMEOUT = 10
READ_TIMEOUT = 60
REQUEST_TIMEOUT = (CONNECT_TIMEOUT, READ_TIMEOUT)


class Cluster:
    """A namespace of a cluster, reached through the official client."""

    def __init__(self, api_client: client.ApiClient, namespace: str, attempts: int = 6) -> None:
        self.api_client = api_client
        self.namespace = namespace
        self.batch = client.BatchV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        self.attempts = attempts
        #: Whether the server ever answered: until it has, a failed connection is not retried
        #: (a wrong address or a cluster that is down is said at once, not after a minute of retries).
        self._reached = False

    @classmethod
    def connect(
        cls,
        context: str | None = None,
        in_cluster: bool = False,
        namespace: str | None = None,
        kubeconfig: str | None = None,
    ) -> Cluster:
        """From the pod's service account (``in_cluster``) or a kubeconfig (``context`` or its current one).

        ``kubeconfig`` is one file or a ``:``-separated list, as $KUBECONFIG is (which it
        overrides; without either, ~/.kube/config). Each way of getting this wrong ends in one
        ConfigError that says what is missing and how to give it.
        """
        configuration = client.Configuration()
        try:
            if in_cluster:
                default_namespace = _load_in_cluster(configuration)
            else:
                default_namespace = _load_kubeconfig(configuration, kubeconfig, context)
        except OSError as exc:
            raise ConfigError(f"cannot load the Kubernetes configuration: {exc}") from None
        # One retry policy, ours (see _call): urllib3's own would retry a dead server three
        # times per request and log a warning each time.
        configuration.retries = False
        return cls(client.ApiClient(configuration), namespace or default_namespace)

    # -- Jobs ---------------------------------------------------------------------------------

    def create_job(self, job: client.V1Job) -> client.V1Job | None:
        """The created Job, or None when one of that name exists already (the caller decides if it is ours)."""
        try:
            return self._call(
                "create",
                "jobs",
                lambda: self.batch.create_namespaced_job(self.namespace, job, _request_timeout=REQUEST_TIMEOUT),
            )
        except _Conflict:
            return None

    def read_job(self, name: str) -> client.V1Job | None:
        try:
            return self._call(
                "get",
                "jobs",
                lambda: self.batch.read_namespaced_job(name, self.namespace, _request_timeout=REQUEST_TIMEOUT),
            )
        except _NotFound:
            return None

    def list_jobs(self, labels: dict[str, str]) -> list[client.V1Job]:
        """Jobs carrying all of ``labels`` (checked here too: a selector is only a hint to a proxy or emulator)."""
        selector = ",".join(f"{key}={value}" for key, value in labels.items())
        found = self._call(
            "list",
            "jobs",
            lambda: self.batch.list_namespaced_job(
                self.namespace, label_selector=selector, _request_timeout=REQUEST_TIMEOUT
            ),
        )
        return [job for job in found.items if _has_labels(job.metadata, labels)]

    def delete_job(self, name: str) -> bool:
        """Deletes the Job and, through garbage collection, its pods; False if it was already gone."""
        body = client.V1DeleteOptions(propagation_policy="Background")
        try:
            self._call(
                "delete",
                "jobs",
                lambda: self.batch.delete_namespaced_job(
                    name, self.namespace, body=body, _request_timeout=REQUEST_TIMEOUT
                ),
            )
        except _NotFound:
            return False
        return True

    def wait_job(
        self,
        name: str,
        done: Callable[[client.V1Job], bool],
        idle: Callable[[], None] | None = None,
        timeout: float | None = None,
    ) -> client.V1Job:
        """Blocks until ``done(job)``: list, then watch from the list's version; re-list on 410 or a closed stream.

        ``idle`` is called each time a watch ends with nothing decided (every few minutes); past
        ``timeout`` seconds the wait ends with a RuntimeFailure instead of going on forever.
        """
        selector = f"metadata.name={name}"
        listed_before = False
        ends = None if timeout is None else time.monotonic() + timeout
        while True:
            if ends is not None and time.monotonic() >= ends:
                raise RuntimeFailure(f"gave up waiting for Job {name} after {timeout:.0f} s (it is still there)")
            if listed_before and idle is not None:
                idle()
            listed_before = True
            listed = self._call(
                "list",
                "jobs",
                lambda: self.batch.list_namespaced_job(
                    self.namespace, field_selector=selector, _request_timeout=REQUEST_TIMEOUT
                ),
            )
            job = next((item for item in listed.items if item.metadata.name == name), None)
            if job is None:
                raise RuntimeFailure(f"Job {name} no longer exists in namespace {self.namespace} (deleted?)")
            if done(job):
                return job
            watch_seconds = WATCH_SECONDS if ends is None else max(1, min(WATCH_SECONDS, int(ends - time.monotonic())))
            stream = watch.Watch().stream(
                self.batch.list_namespaced_job,
                self.namespace,
                field_selector=selector,
                resource_version=listed.metadata.resource_version,
                timeout_seconds=watch_seconds,
                _request_timeout=watch_seconds + min(30, watch_seconds),
            )
            try:
                for event in stream:
                    job = event["object"]
                    if job.metadata.name != name:
                        continue
                    if event["type"] == "DELETED":
                        raise RuntimeFailure(f"Job {name} was deleted while the controller waited for it")
                    if done(job):
                        return job
            except ApiException as exc:
                if exc.status != 410:
                    raise self._translate(exc, "watch", "jobs") from None
                log.debug("watch on %s expired (410); listing again", name)
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                log.debug("watch on %s dropped (%s); listing again", name, exc)
                time.sleep(1)

    # -- Services (a multi-node step's headless Service) ------------------------------------------

    def create_service(self, service: client.V1Service) -> client.V1Service | None:
        """The created Service, or None when one of that name exists already."""
        try:
            return self._call(
                "create", "services", lambda: self.core.create_namespaced_service(self.namespace, service)
            )
        except _Conflict:
            return None

    def read_service(self, name: str) -> client.V1Service | None:
        try:
            return self._call("get", "services", lambda: self.core.read_namespaced_service(name, self.namespace))
        except _NotFound:
            return None

    def delete_service(self, name: str) -> bool:
        """False if it was already gone (its Job's deletion takes it along, as its owner)."""
        try:
            self._call("delete", "services", lambda: self.core.delete_namespaced_service(name, self.namespace))
        except _NotFound:
            return False
        return True

    # -- Pods -----------------------------------------------------------------------------------

    def job_pods(self, job_name: str) -> list[client.V1Pod]:
        """The Job's pods, oldest first."""
        labels = {JOB_NAME_LABEL: job_name}
        selector = f"{JOB_NAME_LABEL}={job_name}"
        found = self._call(
            "list",
            "pods",
            lambda: self.core.list_namespaced_pod(
                self.namespace, label_selector=selector, _request_timeout=REQUEST_TIMEOUT
            ),
        )
        pods = [pod for pod in found.items if _has_labels(pod.metadata, labels)]
        return sorted(pods, key=lambda pod: (pod.metadata.creation_timestamp or 0, pod.metadata.name))

    def pod_log(self, pod: str, container: str, follow: bool = False) -> Iterator[str]:
        """The container's log, line by line; with ``follow``, until the container ends."""
        try:
            response = self._call(
                "get",
                "pods/log",
                lambda: self.core.read_namespaced_pod_log(
                    pod,
                    self.namespace,
                    container=container,
                    follow=follow,
                    _preload_content=False,
                    # A followed log may be quiet for long: no read timeout then.
                    _request_timeout=(CONNECT_TIMEOUT, None if follow else READ_TIMEOUT),
                ),
            )
        except _NotFound:
            raise RuntimeFailure(f"pod {pod} is gone; its log went with it") from None
        try:
            pending = b""
            for chunk in response.stream(4096):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    yield line.decode("utf-8", "replace")
            if pending:
                yield pending.decode("utf-8", "replace")
        finally:
            response.release_conn()

    # -- The one way every call is made ----------------------------------------------------------

    def _call(self, verb: str, resource: str, request: Callable[[], T]) -> T:
        retrying = Retrying(
            retry=retry_if_exception(self._retryable),
            stop=stop_after_attempt(self.attempts),
            wait=_retry_after_or(wait_exponential_jitter(multiplier=0.5, max=20)),
            before_sleep=lambda state: log.warning(
                "%s %s: %s; retrying (attempt %d of %d)",
                verb,
                resource,
                _describe_transient(state.outcome.exception() if state.outcome else None),
                state.attempt_number + 1,
                self.attempts,
            ),
            reraise=True,
        )
        try:
            result = retrying(request)
        except ApiException as exc:
            raise self._translate(exc, verb, resource) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            host = self.api_client.configuration.host
            raise RuntimeFailure(
                f"cannot reach the Kubernetes API server at {host} ({_unreachable(exc)}); "
                "is the cluster up, and is this the right context?"
            ) from None
        self._reached = True
        return result

    def _retryable(self, exc: BaseException) -> bool:
        if isinstance(exc, ApiException):
            self._reached = True  # it answered, if only to refuse
        return _transient(exc) and (self._reached or isinstance(exc, ApiException))

    def _translate(self, exc: ApiException, verb: str, resource: str) -> Exception:  # noqa: PLR0911 - one per status
        status, message = exc.status, _status_message(exc)
        if status == 409:
            return _Conflict(message)
        if status == 404:
            if verb in ("create", "list", "watch"):
                return ConfigError(f"namespace {self.namespace!r} not found (create it, or pass -n NAMESPACE)")
            return _NotFound(message)
        if status == 403:
            return ConfigError(
                f"forbidden: cannot {verb} {resource} in namespace {self.namespace!r} "
                f"(grant the Role '{verb}' on '{resource}'; the Helm chart's Role has what saige-k8s needs): {message}"
            )
        if status == 401:
            return ConfigError(f"the API server rejected the credentials (401 Unauthorized): {message}")
        if status in (400, 422):
            return ConfigError(f"the API server refused to {verb} {resource}: {message}")
        return RuntimeFailure(f"{verb} {resource} failed with HTTP {status}: {message}")


class _Conflict(Exception):
    """409: an object of that name exists."""


class _NotFound(Exception):
    """404 on a named object."""


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, ApiException):
        return exc.status in RETRIED_STATUSES
    return isinstance(exc, urllib3.exceptions.HTTPError | ConnectionError)


def _retry_after_or(fallback: Any) -> Callable[[Any], float]:
    """Honour a 429's Retry-After header (capped), else back off exponentially."""

    def wait(state: Any) -> float:
        exc = state.outcome.exception() if state.outcome else None
        header = (exc.headers or {}).get("Retry-After") if isinstance(exc, ApiException) else None
        if header:
            try:
                return min(float(header), 30.0)
            except ValueError:
                pass
        return fallback(state)

    return wait


def _unreachable(exc: BaseException) -> str:
    """Why a connection failed, in words: "connection refused", "no answer within 10 s"."""
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        exc = exc.reason
    if isinstance(exc, urllib3.exceptions.NewConnectionError):
        return str(exc).rsplit("] ", 1)[-1].rsplit(": ", 1)[-1].lower()
    if isinstance(exc, urllib3.exceptions.ConnectTimeoutError):
        return f"no connection within {CONNECT_TIMEOUT} s"
    if isinstance(exc, urllib3.exceptions.ReadTimeoutError):
        return f"no answer within {READ_TIMEOUT} s"
    if isinstance(exc, urllib3.exceptions.SSLError):
        return f"TLS failed: {_first_line(exc)}"
    return _first_line(exc)


def _describe_transient(exc: BaseException | None) -> str:
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {exc.reason or ''}".strip()
    return _first_line(exc) if exc else "error"


def _status_message(exc: ApiException) -> str:
    """The Status object's message when the server sent one, else the HTTP reason."""
    try:
        body = json.loads(exc.body) if exc.body else {}
    except (TypeError, ValueError):
        body = {}
    return str(body.get("message") or exc.reason or f"HTTP {exc.status}")


def _has_labels(metadata: client.V1ObjectMeta, labels: dict[str, str]) -> bool:
    own = metadata.labels or {}
    return all(own.get(key) == value for key, value in labels.items())


def _load_in_cluster(configuration: client.Configuration) -> str:
    """Fills ``configuration`` from the pod's service account; the pod's namespace."""
    if not (os.environ.get("KUBERNETES_SERVICE_HOST") and os.environ.get("KUBERNETES_SERVICE_PORT")):
        raise ConfigError(
            "--in-cluster: not running in a Kubernetes pod (KUBERNETES_SERVICE_HOST/PORT are not set); "
            "outside a cluster, leave --in-cluster out and use a kubeconfig"
        )
    try:
        config.load_incluster_config(client_configuration=configuration)
    except ConfigException as exc:
        raise ConfigError(
            f"--in-cluster: cannot use the pod's service account: {_first_line(exc)} "
            "(the pod needs automountServiceAccountToken: true)"
        ) from None
    try:
        return IN_CLUSTER_NAMESPACE.read_text(encoding="utf-8").strip() or "default"
    except OSError:
        return "default"


def kubeconfig_paths(kubeconfig: str | None = None) -> list[Path]:
    """Where a kubeconfig is looked for: ``kubeconfig``, else $KUBECONFIG, else ~/.kube/config."""
    given = kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
    return [Path(part).expanduser() for part in given.split(os.pathsep) if part]


def _load_kubeconfig(configuration: client.Configuration, kubeconfig: str | None, context: str | None) -> str:
    """Fills ``configuration`` from the kubeconfig's context; that context's namespace."""
    paths = kubeconfig_paths(kubeconfig)
    found = [path for path in paths if path.is_file()]
    if not found:
        looked = ", ".join(map(str, paths)) or "(an empty list)"
        raise ConfigError(
            f"no kubeconfig: none at {looked} (pass --kubeconfig FILE or set KUBECONFIG; inside a pod use --in-cluster)"
        )
    where = os.pathsep.join(map(str, found))
    try:  # read as load_kube_config reads it (files merged), but without needing a current context
        merged = kube_config.KubeConfigMerger(where).config.value
    except (ConfigException, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read the kubeconfig {where}: {_first_line(exc)}") from None
    contexts = {
        entry.value.get("name"): entry.value.get("context") or {}
        for entry in merged.get("contexts") or []
        if isinstance(getattr(entry, "value", None), dict)
    }
    known = ", ".join(map(str, contexts)) or "none"
    name = context or merged.get("current-context")
    if not name:
        raise ConfigError(f"the kubeconfig {where} has no current context: pass --context (known contexts: {known})")
    if name not in contexts:
        which = "context" if context else "the current context"
        raise ConfigError(f"{which} {name!r} does not exist in the kubeconfig {where} (known contexts: {known})")
    try:
        config.load_kube_config(config_file=where, context=name, client_configuration=configuration)
    except ConfigException as exc:
        raise ConfigError(f"cannot use context {name!r} of the kubeconfig {where}: {_first_line(exc)}") from None
    return contexts[name].get("namespace") or "default"


def _first_line(exc: object) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
