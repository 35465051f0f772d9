"""A fake Kubernetes API server for tests of synchronous code that uses the official ``kubernetes`` client.

Why: the controller under test is synchronous (``kubernetes.client`` over urllib3), while kmock's
``KubernetesEmulator`` is an aiohttp app. ``KubeEmulator`` runs the emulator on 127.0.0.1 (random port)
in a background thread with its own event loop, and gives the test thread-safe helpers to act as the
cluster (``put``, ``patch_status``, ``set_log``), to inspect what the client did (``objects``,
``requests``) and to inject failures (``forbid``, ``fail_next``, ``expire_watch``)::

    from tests import kube_emulator

    kube = kube_emulator.kube  # the fixture (a plain re-export keeps ruff's F811 quiet)

    def test_it(kube):
        with kube.api_client() as api:
            kubernetes.client.BatchV1Api(api).create_namespaced_job("default", {...})

What is emulated (kmock 0.8 plus the fixes in ``_Emulator`` below):

* jobs (batch/v1), pods, configmaps, services (v1): create / get / list / JSON-merge PATCH / delete, 409
  AlreadyExists on a duplicate name, 404 NotFound with real-looking Status bodies.  The server stamps
  ``metadata.namespace``, ``uid``, ``creationTimestamp``, ``resourceVersion`` (a global counter, bumped on
  every change) and resolves ``generateName``.  DELETE answers a ``Status`` Success, as a real server does.
* namespaces are served here, not by kmock (kmock 0.8 mis-parses ``/api/v1/namespaces[/x]``): get, list,
  create, delete.  The fixture creates ``default``.  A create in a namespace that does not exist gets
  404 ``namespaces "x" not found``; get/patch/delete there get the object's 404; list/watch there
  return an empty list -- exactly like a real API server, so report "namespace X not found" from a
  ``read_namespace`` 404 or a create 404, never from an empty list.
* list and watch honour ``labelSelector`` (``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``, ``k in (a,b)``,
  ``k notin (a,b)``) and ``fieldSelector`` (``dotted.path=v``, ``==``, ``!=``, e.g. ``metadata.name=x``,
  ``status.phase=Failed``).  kmock itself ignores both.
* watch: ``timeoutSeconds`` ends the stream server-side (kmock ignores it).  Without ``resourceVersion``
  (or with "0") the stream first sends every existing object as ADDED; with a resourceVersion it sends
  ADDED only for objects whose resourceVersion is newer.  Then ADDED/MODIFIED/DELETED as changes happen
  (client calls and ``put``/``patch_status``).  ``expire_watch`` makes open streams and the next N watch
  requests send ERROR 410 Expired and end.  A watch ends when the client hangs up or the emulator exits.
* pods/log: ``read_namespaced_pod_log`` returns the ``set_log`` text (``tailLines`` honoured); with
  ``follow=true`` the text is sent chunked, line by line, and the stream ends.  404 if the pod is absent.

What is NOT emulated (the controller must not depend on it, or must do it client-side):

* garbage collection by owner: deleting an object (through the API or ``delete``, which plays the TTL
  controller) deletes every object whose ``metadata.ownerReferences`` names its uid, and theirs in turn,
  each with a DELETED event -- at once, whatever ``propagationPolicy`` says.

* no controllers: Jobs never create Pods, never finish; a Pod is not owned by its Job unless the test
  gives it an ownerReference.  Tests do that with ``put``/``patch_status``.
* PATCH is a naive recursive dict merge (None deletes a key, lists are replaced); JSON-patch (a list
  body) and server-side apply are not supported; PUT (replace) is answered 404.  No ``status``
  subresource split: a PATCH to ``.../status`` patches the whole object.  No validation, no defaults.
* no ``limit``/``continue`` paging, no ``resourceVersionMatch``, no bookmarks, no ``sendInitialEvents``;
  a too-old resourceVersion is never detected on its own -- use ``expire_watch``.  A watch with a
  label selector does not turn "stopped matching" into DELETED.  Watches on namespaces are not served.
* logs: ``container``, ``previous``, ``sinceSeconds``, ``timestamps``, ``limitBytes`` are ignored.
* no auth: every request is allowed unless ``forbid`` says otherwise.
* kubernetes 37's client is pydantic-generated and validates what it reads: objects given to ``put`` need
  the fields a real server always fills (e.g. a containerStatus needs image, imageID, ready, restartCount,
  and a terminated state an exitCode), or the client raises ``ValidationError`` while deserializing.

The official client (kubernetes 37): ``Watch().stream(...)`` reading an ERROR 410 event raises
``ApiException(status=410, reason="Expired: too old resource version")`` at once when ``timeout_seconds``
is passed (it disables its retries); without ``timeout_seconds`` it first silently re-watches from its
last seen resourceVersion and raises only on a second 410 in a row.  A non-2xx reply to a watch request
(e.g. ``forbid("watch", "jobs")``) raises ``ApiException`` with that status before any event.  Plain
``read_namespaced_pod_log`` returns ``str``; pass ``_preload_content=False`` for raw bytes / streaming.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import http
import itertools
import json
import re
import secrets
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import aiohttp.web
import kmock
import kubernetes.client
import pytest

# plural -> (kmock resource, kind, API group); the resources the controller uses.
RESOURCES: dict[str, tuple[str, str, str]] = {
    "jobs": ("batch/v1/jobs", "Job", "batch"),
    "pods": ("v1/pods", "Pod", ""),
    "configmaps": ("v1/configmaps", "ConfigMap", ""),
    "services": ("v1/services", "Service", ""),
    "namespaces": ("v1/namespaces", "Namespace", ""),
}
_KIND_TO_PLURAL = {kind: plural for plural, (_, kind, _) in RESOURCES.items()}

# /api/v1[/namespaces/NS]/PLURAL[/NAME[/SUB]] and /apis/GROUP/VERSION/...; backtracking makes
# /api/v1/namespaces/x parse as plural=namespaces, name=x.
_PATH = re.compile(
    r"^/(?:api|apis/(?P<group>[^/]+))/(?P<version>[^/]+)(?:/namespaces/(?P<namespace>[^/]+))?"
    r"/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>[^/]+))?$"
)
_LABEL_TERM = re.compile(
    r"^\s*(?P<neg>!?)\s*(?P<key>[\w./-]+)\s*(?:(?P<op>==|!=|=)\s*(?P<value>[\w./-]*)"
    r"|\s+(?P<set_op>in|notin)\s*\((?P<values>[^)]*)\))?\s*$"
)
_FIELD_TERM = re.compile(r"^\s*(?P<path>[\w.]+)\s*(?P<op>==|!=|=)\s*(?P<value>.*?)\s*$")
_WATCH_POLL_S = 0.05  # how often an idle watch checks for expiry/timeout/shutdown


class Sent(NamedTuple):
    """One HTTP request the client sent, as the tests want to assert on it."""

    method: str
    path: str
    params: dict[str, str]
    body: Any  # parsed JSON, or None


@dataclass
class _Fault:
    verb: str
    resource: str
    status: int
    times: int | None  # None: forever
    retry_after: int | None = None
    user: str = ""


class _Route(NamedTuple):
    """A request's Kubernetes address, parsed once with our own regexp."""

    verb: str  # get list watch create update patch delete deletecollection
    plural: str
    namespace: str | None
    name: str | None
    sub: str | None

    @property
    def resource(self) -> str:
        return f"{self.plural}/{self.sub}" if self.sub else self.plural

    @property
    def group(self) -> str:
        return RESOURCES.get(self.plural, ("", "", ""))[2]

    @property
    def qualified(self) -> str:  # "jobs.batch", "pods": how Status messages name a resource
        return f"{self.plural}.{self.group}" if self.group else self.plural


def _route(request: aiohttp.web.BaseRequest) -> _Route | None:
    match = _PATH.match(request.path)
    if not match:
        return None
    name, method = match["name"], request.method.upper()
    if method == "GET":
        verb = "watch" if request.query.get("watch") in ("true", "1") else "get" if name else "list"
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method, "")
        verb = verb or ("delete" if name else "deletecollection")
    return _Route(verb, match["plural"], match["namespace"], name, match["sub"])


def _status(code: int, reason: str, message: str, details: dict | None = None, **headers: str) -> aiohttp.web.Response:
    """A Kubernetes ``Status`` reply, the body the official client puts into ``ApiException.body``."""
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure" if code >= 400 else "Success"}
    body |= {"message": message, "reason": reason, "details": details or {}, "code": code}
    body = {key: value for key, value in body.items() if value != ""}
    return aiohttp.web.json_response(body, status=code, headers=headers)


def _not_found(route: _Route, name: str | None = None) -> aiohttp.web.Response:
    name = name or route.name
    details = {"name": name, "group": route.group, "kind": route.plural}
    return _status(404, "NotFound", f'{route.qualified} "{name}" not found', details)


def _dig(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def _selected(obj: dict, params: Any) -> bool:
    """Whether ``obj`` passes the request's labelSelector and fieldSelector (a subset of the grammar)."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in re.findall(r"[^,(]+(?:\([^)]*\))?", params.get("labelSelector", "")):
        match = _LABEL_TERM.match(term)
        if not match:
            raise ValueError(f"unsupported label selector term: {term!r}")
        key, value = match["key"], labels.get(match["key"])
        if match["set_op"]:
            values = {v.strip() for v in match["values"].split(",")}
            ok = (value in values) if match["set_op"] == "in" else (value not in values)
        elif match["op"]:
            ok = (value == match["value"]) if match["op"] != "!=" else (value != match["value"])
        else:
            ok = (key in labels) != bool(match["neg"])
        if not ok:
            return False
    for term in filter(None, params.get("fieldSelector", "").split(",")):
        match = _FIELD_TERM.match(term)
        if not match:
            raise ValueError(f"unsupported field selector term: {term!r}")
        value = _dig(obj, match["path"])
        equal = ("" if value is None else str(value)) == match["value"]
        if equal == (match["op"] == "!="):
            return False
    return True


class _Emulator(kmock.KubernetesEmulator):
    """kmock's emulator with the fixes and features listed in the module docstring.

    Runs entirely on the harness's event loop; ``harness`` holds the thread-shared state.
    """

    harness: KubeEmulator

    async def __call__(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # Everything the harness adds that needs no kmock parsing happens here, before kmock parses
        # the request (and before kmock crashes on /api/v1/namespaces).
        body = await raw.read()
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = None
        with self.harness._guard:
            self.harness._sent.append(Sent(raw.method, raw.path, dict(raw.query), data))
        route = _route(raw)
        if route is None:
            return await super().__call__(raw)
        if (fault := self.harness._take_fault(route)) is not None:
            return fault
        if route.plural == "namespaces":
            return self._serve_namespaces(route, data)
        if route.plural == "pods" and route.sub == "log":
            return await self._serve_log(route, raw)
        if route.verb == "create" and route.namespace not in self.harness._namespaces:
            details = {"name": route.namespace, "kind": "namespaces"}
            return _status(404, "NotFound", f'namespaces "{route.namespace}" not found', details)
        return await super().__call__(raw)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        route = _route(request._raw_request) if request._raw_request is not None else None
        if route is None or request.resource is None:
            return await super()._handle(request)
        if request.action == kmock.action.CREATE and isinstance(request.data, dict):
            self.harness._stamp(request.data, route.namespace)  # kmock stores this very dict
        elif request.action == kmock.action.UPDATE and isinstance(request.data, dict):
            request.data.setdefault("metadata", {})["resourceVersion"] = self.harness._next_rv()
        owner_uid = None
        if request.action == kmock.action.DELETE and route.name is not None:
            key = (request.resource, route.namespace, route.name)
            if key in self._objects and not self._objects[key].deleted:
                owner_uid = (self._objects[key].raw.get("metadata") or {}).get("uid")
        try:
            response = await super()._handle(request)
        except kmock.KubernetesObjectNotFoundError:
            return _not_found(route)
        except kmock.KubernetesError as exc:
            if exc.status != 409:
                raise
            name = (request.data.get("metadata") or {}).get("name")
            details = {"name": name, "group": route.group, "kind": route.plural}
            return _status(409, "AlreadyExists", f'{route.qualified} "{name}" already exists', details)
        if request.action == kmock.action.DELETE:
            if owner_uid:
                async with self._lock:
                    await self._collect_garbage(owner_uid)
            details = {"name": route.name, "group": route.group, "kind": route.plural}
            return _status(200, "", "", details)  # a real server's reply to an immediate delete
        return response

    async def _serve_list(self, request: kmock.Request) -> dict:
        result = await super()._serve_list(request)
        kind = RESOURCES.get(request.resource.plural, ("", "", ""))[1]
        return {
            "kind": f"{kind}List",
            "apiVersion": f"{request.resource.group}/v1".lstrip("/"),
            "metadata": {"resourceVersion": self.harness._current_rv()},
            "items": [obj for obj in result["items"] if _selected(obj, request.params)],
        }

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        """Replaces kmock's watch: selectors, timeoutSeconds, resourceVersion, expiry, clean shutdown."""
        yield b""  # send the headers now, so the client is not stuck before the first event
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(request.params.get("timeoutSeconds") or "inf")
        since = int(request.params.get("resourceVersion") or 0)
        bus = self._buses[request.resource]
        async with self._lock:  # mark the bus and take the snapshot atomically: no event is lost
            marker = await bus.mark()
            initial = [
                {"type": "ADDED", "object": copy.deepcopy(obj.raw)}
                for (resource, namespace, _), obj in self._objects.items()
                if resource == request.resource and not obj.deleted
                if request.namespace in (None, namespace)
                if int(obj.raw.get("metadata", {}).get("resourceVersion") or 0) > since
            ]
        gone = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "too old resource version"}
        gone |= {"reason": "Expired", "code": 410}
        try:
            expired, epoch = self.harness._watch_started(request.resource.plural)
            if expired:
                yield {"type": "ERROR", "object": gone}
                return
            for event in initial:
                if _selected(event["object"], request.params):
                    yield event
            while not self.harness._closing and loop.time() < deadline and not self._gone(request):
                if self.harness._epochs.get(request.resource.plural, 0) != epoch:  # expired while open
                    yield {"type": "ERROR", "object": gone}
                    return
                timeout = min(_WATCH_POLL_S, max(0.0, deadline - loop.time()))
                try:
                    event = await asyncio.wait_for(bus.get(since=marker), timeout)
                except TimeoutError:
                    continue
                obj = event.get("object") or {}
                namespace = (obj.get("metadata") or {}).get("namespace")
                if request.namespace in (None, namespace) and _selected(obj, request.params):
                    yield event
        finally:
            await bus.unmark(marker)

    async def _collect_garbage(self, owner_uid: str) -> None:
        """Delete what ``owner_uid`` owned, and what that owned (the caller holds the lock)."""
        for (resource, _, _), obj in list(self._objects.items()):
            if obj.deleted:
                continue
            meta = obj.raw.get("metadata") or {}
            if any(ref.get("uid") == owner_uid for ref in meta.get("ownerReferences") or []):
                raw = copy.deepcopy(obj.raw)
                obj.delete()
                await self._buses[resource].put({"type": "DELETED", "object": raw})
                if meta.get("uid"):
                    await self._collect_garbage(meta["uid"])

    @staticmethod
    def _gone(request: kmock.Request) -> bool:
        """Whether the client hung up (aiohttp does not cancel the handler, so a watch must look)."""
        transport = request._raw_request.transport if request._raw_request is not None else None
        return transport is None or transport.is_closing()

    def _serve_namespaces(self, route: _Route, data: Any) -> aiohttp.web.Response:
        namespaces = self.harness._namespaces
        if route.verb == "list":
            items = [ns for ns in namespaces.values() if _selected(ns, {})]
            meta = {"resourceVersion": self.harness._current_rv()}
            return aiohttp.web.json_response(
                {"kind": "NamespaceList", "apiVersion": "v1", "metadata": meta, "items": items}
            )
        if route.verb == "create" and isinstance(data, dict):
            name = (data.get("metadata") or {}).get("name")
            if name in namespaces:
                return _status(
                    409, "AlreadyExists", f'namespaces "{name}" already exists', {"name": name, "kind": "namespaces"}
                )
            return aiohttp.web.json_response(self.harness._add_namespace(data), status=201)
        if route.verb in ("get", "delete") and route.sub is None:
            if route.name not in namespaces:
                return _not_found(route)
            obj = namespaces[route.name] if route.verb == "get" else namespaces.pop(route.name)
            return aiohttp.web.json_response(obj)
        return _status(405, "MethodNotAllowed", f"{route.verb} on namespaces is not emulated")

    async def _serve_log(self, route: _Route, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        key = (kmock.resource(RESOURCES["pods"][0]), route.namespace, route.name)
        if key not in self._objects or self._objects[key].deleted:
            return _not_found(route._replace(sub=None))
        lines = self.harness._logs.get((route.namespace, route.name), "").splitlines(keepends=True)
        if raw.query.get("tailLines"):
            lines = lines[-int(raw.query["tailLines"]) :] if int(raw.query["tailLines"]) else []
        if raw.query.get("follow") not in ("true", "1"):
            return aiohttp.web.Response(text="".join(lines), content_type="text/plain")
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "text/plain"})
        await response.prepare(raw)
        for line in lines:
            await response.write(line.encode())
            await asyncio.sleep(0)  # separate chunks, as a following log is
        await response.write_eof()
        return response


class KubeEmulator:
    """The emulator on a loopback port, run in a background thread; a context manager.

    All public methods are called from the test's thread and are thread-safe: they either run on the
    emulator's loop (``_run``) or touch state guarded by ``_guard``.
    """

    def __init__(self, namespaces: tuple[str, ...] = ("default",)) -> None:
        self._guard = threading.Lock()
        self._faults: list[_Fault] = []
        self._expiries: dict[str, int] = {}  # watch requests still to be refused at their start
        self._epochs: dict[str, int] = {}  # bumped by expire_watch: open watches see the change and end
        self._namespaces: dict[str, dict] = {}
        self._logs: dict[tuple[str, str], str] = {}
        self._sent: list[Sent] = []
        self._rv = itertools.count(1)
        self._last_rv = 0
        self._closing = False
        self._clients: list[kubernetes.client.ApiClient] = []
        self._initial_namespaces = namespaces
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    # -- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> KubeEmulator:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kube-emulator", daemon=True)
        self._thread.start()
        try:
            self._run(self._astart())
        except BaseException:
            self.__exit__(None, None, None)
            raise
        for name in self._initial_namespaces:
            self._add_namespace({"metadata": {"name": name}})
        return self

    def __exit__(self, *exc_info: object) -> None:
        for api in self._clients:
            api.close()
        self._clients.clear()
        self._closing = True  # live watches end within _WATCH_POLL_S
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            if getattr(self, "_server", None) is not None:
                self._run(self._astop())
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            self._loop = self._thread = None

    async def _astart(self) -> None:
        self._emulator = _Emulator()
        self._emulator.harness = self
        for plural, (resource, kind, _) in RESOURCES.items():
            info = kmock.ResourceInfo(kind=kind, singular=kind.lower(), namespaced=plural != "namespaces")
            info.verbs.update({"get", "list", "watch", "create", "patch", "delete"})
            if plural == "pods":
                info.subresources.update({"log", "status"})
            self._emulator.resources[resource] = info
        await self._emulator.__aenter__()
        self._server = kmock.Server(self._emulator)
        await self._server.__aenter__()
        self.url = str(self._server.url).rstrip("/")

    async def _astop(self) -> None:
        await self._server.__aexit__(None, None, None)
        await self._emulator.__aexit__(None, None, None)
        self._server = None
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _run(self, coro: Any) -> Any:
        assert self._loop is not None, "use KubeEmulator as a context manager"
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    # -- the client side ---------------------------------------------------------------------------

    @property
    def configuration(self) -> kubernetes.client.Configuration:
        """A fresh client Configuration pointing at the emulator, without auth."""
        return kubernetes.client.Configuration(host=self.url)

    def api_client(self) -> kubernetes.client.ApiClient:
        """An ApiClient for the emulator; closed when the emulator exits (closing it earlier is fine)."""
        api = kubernetes.client.ApiClient(self.configuration)
        self._clients.append(api)
        return api

    # -- acting as the cluster ---------------------------------------------------------------------

    def put(self, obj: dict) -> dict:
        """Create or replace ``obj`` server-side (kind must be a known one); watchers get ADDED/MODIFIED."""
        obj = copy.deepcopy(obj)
        plural = _KIND_TO_PLURAL[obj["kind"]]
        if plural == "namespaces":
            return self._add_namespace(obj)
        namespace = (obj.get("metadata") or {}).get("namespace") or "default"

        async def put() -> dict:
            resource = kmock.resource(RESOURCES[plural][0])
            async with self._emulator._lock:
                self._stamp(obj, namespace)
                key = (resource, namespace, obj["metadata"]["name"])
                existing = key in self._emulator.objects and not self._emulator.objects[key].deleted
                if key in self._emulator.objects:
                    self._emulator.objects[key].create(obj)  # a new version (or a re-creation)
                else:
                    self._emulator.objects[key] = obj
                event = {"type": "MODIFIED" if existing else "ADDED", "object": copy.deepcopy(obj)}
                await self._emulator._buses[resource].put(event)
            return copy.deepcopy(obj)

        return self._run(put())

    def patch_status(self, resource: str, namespace: str, name: str, status: dict) -> dict:
        """Merge ``status`` into the object's ``.status`` (a new resourceVersion); watchers get MODIFIED."""

        async def patch() -> dict:
            key = (kmock.resource(RESOURCES[resource][0]), namespace, name)
            async with self._emulator._lock:
                if key not in self._emulator.objects or self._emulator.objects[key].deleted:
                    raise KeyError(f"no {resource} {namespace}/{name}")
                obj = self._emulator.objects[key]
                obj.patch({"status": status, "metadata": {"resourceVersion": self._next_rv()}})
                await self._emulator._buses[key[0]].put({"type": "MODIFIED", "object": copy.deepcopy(obj.raw)})
                return copy.deepcopy(obj.raw)

        return self._run(patch())

    def delete(self, resource: str, namespace: str, name: str) -> None:
        """Delete an object server-side, as the TTL controller does a finished Job; its dependents follow."""

        async def delete() -> None:
            key = (kmock.resource(RESOURCES[resource][0]), namespace, name)
            async with self._emulator._lock:
                if key not in self._emulator.objects or self._emulator.objects[key].deleted:
                    raise KeyError(f"no {resource} {namespace}/{name}")
                obj = self._emulator.objects[key]
                raw = copy.deepcopy(obj.raw)
                obj.delete()
                await self._emulator._buses[key[0]].put({"type": "DELETED", "object": raw})
                if (raw.get("metadata") or {}).get("uid"):
                    await self._emulator._collect_garbage(raw["metadata"]["uid"])

        self._run(delete())

    def set_log(self, namespace: str, pod: str, text: str) -> None:
        """Make ``read_namespaced_pod_log`` of that pod return ``text`` (the pod must exist: ``put`` it)."""
        with self._guard:
            self._logs[namespace, pod] = text

    # -- inspecting --------------------------------------------------------------------------------

    def objects(self, resource: str, namespace: str | None = None) -> list[dict]:
        """Copies of the live objects of ``resource`` ("jobs", "pods", ...), in one namespace or all."""
        if resource == "namespaces":
            with self._guard:
                return copy.deepcopy(list(self._namespaces.values()))

        async def read() -> list[dict]:
            wanted = kmock.resource(RESOURCES[resource][0])
            async with self._emulator._lock:
                return [
                    copy.deepcopy(obj.raw)
                    for (res, ns, _), obj in self._emulator.objects.items()
                    if res == wanted and not obj.deleted and namespace in (None, ns)
                ]

        return self._run(read())

    def requests(self) -> list[Sent]:
        """Every request the server received so far, in order (including the faulted ones)."""
        with self._guard:
            return list(self._sent)

    # -- fault injection ---------------------------------------------------------------------------

    def forbid(
        self, verb: str, resource: str, *, times: int | None = None, user: str = "system:serviceaccount:default:default"
    ) -> None:
        """Answer matching requests with an RBAC-style 403 (all of them, or the next ``times``).

        ``verb`` is a Kubernetes verb (get list watch create update patch delete) or "*";
        ``resource`` a plural ("jobs"), a subresource ("pods/log") or "*".
        """
        with self._guard:
            self._faults.append(_Fault(verb, resource, 403, times, user=user))

    def fail_next(self, verb: str, resource: str, status: int = 500, times: int = 1, retry_after: int = 1) -> None:
        """Answer the next ``times`` matching requests with ``status`` (429 carries ``Retry-After``)."""
        with self._guard:
            self._faults.append(_Fault(verb, resource, status, times, retry_after=retry_after))

    def expire_watch(self, resource: str, times: int = 1) -> None:
        """Expire watches on ``resource``: each open one sends ERROR 410 and ends, and so do the next ``times``
        watch requests, at their start (counted by request, so a watch the client abandoned cannot use one up).

        A real server also answers 410 to a re-watch from the same too-old resourceVersion; ``times=1`` lets
        the official client's one silent retry (no ``timeout_seconds``) fail too, ``times=0`` only ends the
        open watches.
        """
        with self._guard:
            self._expiries[resource] = self._expiries.get(resource, 0) + times
            self._epochs[resource] = self._epochs.get(resource, 0) + 1

    # -- internals shared with _Emulator (called on the loop thread) -------------------------------

    def _take_fault(self, route: _Route) -> aiohttp.web.Response | None:
        with self._guard:
            for fault in self._faults:
                if fault.verb in ("*", route.verb) and fault.resource in ("*", route.resource):
                    if fault.times is not None:
                        fault.times -= 1
                        if fault.times <= 0:
                            self._faults.remove(fault)
                    break
            else:
                return None
        details = {"group": route.group, "kind": route.plural} | ({"name": route.name} if route.name else {})
        if fault.status == 403:
            subject = f'{route.qualified} "{route.name}"' if route.name else route.qualified
            scope = f'in the namespace "{route.namespace}"' if route.namespace else "at the cluster scope"
            message = (
                f'{subject} is forbidden: User "{fault.user}" cannot {route.verb} resource "{route.resource}"'
                f' in API group "{route.group}" {scope}'
            )
            return _status(403, "Forbidden", message, details)
        if fault.status == 429:
            message = "the server has received too many requests and has asked us to try again later"
            details["retryAfterSeconds"] = fault.retry_after
            return _status(429, "TooManyRequests", message, details, **{"Retry-After": str(fault.retry_after)})
        reason = http.HTTPStatus(fault.status).phrase.replace(" ", "")
        return _status(fault.status, reason, f"injected {fault.status} for {route.verb} {route.resource}", details)

    def _watch_started(self, resource: str) -> tuple[bool, int]:
        """Whether a new watch must start with ERROR 410, and the expiry epoch it was opened in."""
        with self._guard:
            expired = self._expiries.get(resource, 0) > 0
            if expired:
                self._expiries[resource] -= 1
            return expired, self._epochs.get(resource, 0)

    def _next_rv(self) -> str:
        with self._guard:
            self._last_rv = next(self._rv)
            return str(self._last_rv)

    def _current_rv(self) -> str:
        with self._guard:
            return str(self._last_rv)

    def _stamp(self, obj: dict, namespace: str | None) -> None:
        """Set what a real API server sets on create: name from generateName, namespace, uid, rv, time."""
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        if namespace:
            meta["namespace"] = namespace
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        meta["resourceVersion"] = self._next_rv()

    def _add_namespace(self, obj: dict) -> dict:
        obj = copy.deepcopy(obj) | {"apiVersion": "v1", "kind": "Namespace"}
        self._stamp(obj, None)
        obj.setdefault("status", {"phase": "Active"})
        with self._guard:
            self._namespaces[obj["metadata"]["name"]] = obj
        return copy.deepcopy(obj)


@pytest.fixture
def kube() -> Iterator[KubeEmulator]:
    """A fresh emulator per test, with the ``default`` namespace; stopped (thread joined) afterwards."""
    with KubeEmulator() as emulator:
        yield emulator
