"""Small, dependable pieces on top of the official ``kubernetes`` client.

* :class:`Informer` — list, then watch from the list's resourceVersion; relists on
  ``410 Gone`` (expired watch) and on dropped connections; keeps a cache of plain dicts.
* :class:`WorkQueue` — deduplicating key queue drained by N worker threads (the
  controller-runtime pattern: events only enqueue keys, workers reconcile the latest state).
* :func:`api_client` — in-cluster config, else kubeconfig, else an explicit host.
* Thin wrappers over CoreV1Api / CustomObjectsApi that return dicts.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.watch.watch import iter_resp_lines

from warmstart.errors import EnvironmentProblem
from warmstart.k8s import contract

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Handler = Callable[[str, Obj], None]


def api_client(*, host: str | None = None, kubeconfig: str | None = None) -> client.ApiClient:
    """An ApiClient: explicit ``host`` (tests), in-cluster, or kubeconfig."""
    if host:
        cfg = client.Configuration(host=host)
        cfg.connection_pool_maxsize = 32
        return client.ApiClient(cfg)
    try:
        if kubeconfig:
            config.load_kube_config(config_file=kubeconfig)
        else:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
    except (config.ConfigException, OSError) as exc:
        raise EnvironmentProblem(
            f"no Kubernetes credentials found ({exc})",
            hint="run inside a pod with a service account, or pass --kubeconfig",
        ) from None
    cfg = client.Configuration.get_default_copy()
    cfg.connection_pool_maxsize = 32
    return client.ApiClient(cfg)


def key_of(obj: Obj) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def split_key(key: str) -> tuple[str, str]:
    ns, _, name = key.partition("/")
    return ns, name


def _raw(resp: Any) -> Obj:
    return json.loads(resp.data)


class Kube:
    """The API calls warmstart makes, returning plain dicts."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)

    # pods
    def list_pods(self, **kw: Any) -> Obj:
        return _raw(self.core.list_pod_for_all_namespaces(_preload_content=False, **kw))

    def get_pod(self, namespace: str, name: str) -> Obj:
        return _raw(self.core.read_namespaced_pod(name, namespace, _preload_content=False))

    def annotate_pod(self, namespace: str, name: str, annotations: dict[str, str | None]) -> Obj:
        body = {"metadata": {"annotations": annotations}}
        return _raw(self.core.patch_namespaced_pod(name, namespace, body,
                                                   _preload_content=False))

    # snapshots
    def list_snapshots(self, namespace: str | None = None, **kw: Any) -> Obj:
        if namespace:
            return self.custom.list_namespaced_custom_object(
                contract.GROUP, contract.VERSION, namespace, contract.PLURAL, **kw)
        return self.custom.list_cluster_custom_object(
            contract.GROUP, contract.VERSION, contract.PLURAL, **kw)

    def get_snapshot(self, namespace: str, name: str) -> Obj:
        return self.custom.get_namespaced_custom_object(
            contract.GROUP, contract.VERSION, namespace, contract.PLURAL, name)

    def create_snapshot(self, obj: Obj) -> Obj:
        ns = obj["metadata"]["namespace"]
        return self.custom.create_namespaced_custom_object(
            contract.GROUP, contract.VERSION, ns, contract.PLURAL, obj)

    def replace_snapshot(self, obj: Obj) -> Obj:
        """PUT with ``metadata.resourceVersion``: 409 if someone changed it meanwhile."""
        meta = obj["metadata"]
        return self.custom.replace_namespaced_custom_object(
            contract.GROUP, contract.VERSION, meta["namespace"], contract.PLURAL,
            meta["name"], obj)

    def replace_snapshot_status(self, obj: Obj) -> Obj:
        """PUT the status subresource with ``metadata.resourceVersion`` (409 on a race)."""
        meta = obj["metadata"]
        return self.custom.replace_namespaced_custom_object_status(
            contract.GROUP, contract.VERSION, meta["namespace"], contract.PLURAL,
            meta["name"], obj)


def is_conflict(exc: BaseException) -> bool:
    return isinstance(exc, ApiException) and exc.status == 409


def is_not_found(exc: BaseException) -> bool:
    return isinstance(exc, ApiException) and exc.status == 404


class Informer:
    """List + watch one resource collection into a cache, calling ``handler`` on changes.

    ``handler(event_type, obj)`` gets ``ADDED``, ``MODIFIED`` or ``DELETED``; after a relist it
    gets ``MODIFIED`` for every object still present and ``DELETED`` for vanished ones, so
    handlers must be level-based (enqueue a key, reconcile the current state).
    """

    def __init__(self, name: str, list_func: Callable[..., Any], handler: Handler, *,
                 stop: threading.Event, label_selector: str | None = None,
                 field_selector: str | None = None, watch_timeout: int = 60,
                 backoff: float = 1.0) -> None:
        self.name = name
        self._list = list_func
        self._handler = handler
        self._stop = stop
        self._selectors: dict[str, str] = {}
        if label_selector:
            self._selectors["label_selector"] = label_selector
        if field_selector:
            self._selectors["field_selector"] = field_selector
        self._watch_timeout = watch_timeout
        self._backoff = backoff
        self._cache: dict[str, Obj] = {}
        self._lock = threading.Lock()
        self.synced = threading.Event()
        self.relists = 0

    def get(self, key: str) -> Obj | None:
        with self._lock:
            return self._cache.get(key)

    def items(self) -> list[Obj]:
        with self._lock:
            return list(self._cache.values())

    def _call_list(self, **kw: Any) -> Obj:
        return _raw(self._list(**self._selectors, _preload_content=False, **kw))

    def _relist(self) -> str:
        doc = self._call_list()
        self.relists += 1
        fresh = {key_of(o): o for o in doc.get("items") or []}
        with self._lock:
            gone = [o for k, o in self._cache.items() if k not in fresh]
            self._cache = dict(fresh)
        for obj in gone:
            self._handler("DELETED", obj)
        for obj in fresh.values():
            self._handler("MODIFIED", obj)
        self.synced.set()
        return str((doc.get("metadata") or {}).get("resourceVersion") or "")

    def _events(self, rv: str) -> Iterator[Obj]:
        """One watch request from ``rv``; ends when the server closes it (its timeout)."""
        resp = self._list(**self._selectors, watch=True, resource_version=rv,
                          allow_watch_bookmarks=True, timeout_seconds=self._watch_timeout,
                          _preload_content=False, _request_timeout=self._watch_timeout + 10)
        try:
            for line in iter_resp_lines(resp):
                if self._stop.is_set():
                    return
                if not line.strip():
                    continue
                ev = json.loads(line)
                if ev.get("type") == "ERROR":
                    status = ev.get("object") or {}
                    raise ApiException(status=int(status.get("code") or 500),
                                       reason=str(status.get("message") or "watch error"))
                yield ev
        finally:
            resp.close()
            resp.release_conn()

    def _apply(self, ev: Obj) -> str | None:
        kind, obj = ev.get("type"), ev.get("object") or {}
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if kind == "BOOKMARK":
            return rv
        key = key_of(obj)
        with self._lock:
            if kind == "DELETED":
                self._cache.pop(key, None)
            else:
                self._cache[key] = obj
        self._handler(str(kind), obj)
        return rv

    def run(self) -> None:
        rv: str | None = None
        while not self._stop.is_set():
            try:
                if rv is None:
                    rv = self._relist()
                last = rv
                for ev in self._events(rv):
                    if self._stop.is_set():
                        return
                    last = self._apply(ev) or last
                rv = last  # watch ended by its timeout: resume where it stopped
            except ApiException as exc:
                if exc.status == 410:
                    log.info("%s: watch expired (410 Gone); relisting", self.name)
                else:
                    log.warning("%s: API error %s %s; relisting", self.name, exc.status,
                                exc.reason)
                    self._stop.wait(self._backoff)
                rv = None
            except Exception as exc:  # noqa: BLE001  (connection dropped, server restarted)
                if self._stop.is_set():
                    return
                log.warning("%s: watch failed (%s); relisting", self.name, exc)
                self._stop.wait(self._backoff)
                rv = None

    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.run, name=f"informer-{self.name}", daemon=True)
        t.start()
        return t


class WorkQueue:
    """Keys to reconcile; a key queued twice before it is picked up is reconciled once.

    A key is never reconciled by two workers at once; if it is re-added while being worked on,
    it is reconciled again afterwards. A reconcile may return a delay to be retried later.
    """

    def __init__(self, reconcile: Callable[[str], float | None], *, workers: int,
                 stop: threading.Event, name: str = "queue") -> None:
        self._reconcile = reconcile
        self._workers = workers
        self._stop = stop
        self._name = name
        self._cond = threading.Condition()
        self._queue: list[str] = []
        self._queued: set[str] = set()
        self._active: set[str] = set()
        self._dirty: set[str] = set()

    def add(self, key: str) -> None:
        with self._cond:
            if key in self._active:
                self._dirty.add(key)
            elif key not in self._queued:
                self._queued.add(key)
                self._queue.append(key)
                self._cond.notify()

    def add_after(self, key: str, delay: float) -> None:
        t = threading.Timer(delay, self.add, args=(key,))
        t.daemon = True
        t.start()

    def _take(self) -> str | None:
        with self._cond:
            while not self._queue:
                if self._stop.is_set():
                    return None
                self._cond.wait(0.2)
            key = self._queue.pop(0)
            self._queued.discard(key)
            self._active.add(key)
            return key

    def _done(self, key: str) -> None:
        with self._cond:
            self._active.discard(key)
            if key in self._dirty:
                self._dirty.discard(key)
                if key not in self._queued:
                    self._queued.add(key)
                    self._queue.append(key)
                    self._cond.notify()

    def _worker(self) -> None:
        while (key := self._take()) is not None:
            try:
                delay = self._reconcile(key)
            except Exception:
                log.exception("%s: reconcile of %s failed; retrying", self._name, key)
                delay = 1.0
            finally:
                self._done(key)
            if delay is not None and not self._stop.is_set():
                self.add_after(key, delay)

    def start(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._worker, name=f"{self._name}-{i}", daemon=True)
                   for i in range(self._workers)]
        for t in threads:
            t.start()
        return threads


def wait_synced(informers: list[Informer], stop: threading.Event, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    for inf in informers:
        while not inf.synced.wait(0.1):
            if stop.is_set() or time.monotonic() > deadline:
                return False
    return True


def run_until_stopped(inner: threading.Event, outer: threading.Event | None,
                      start: Callable[[], None]) -> None:
    """Start, then block until SIGTERM/SIGINT (main thread only) or ``outer`` is set."""
    if outer is None and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: inner.set())
    start()
    while not inner.wait(0.5):
        if outer is not None and outer.is_set():
            inner.set()
