"""A fake of the Kubernetes API methods Tolaria's Job launcher calls (BatchV1Api, CoreV1Api,
AppsV1Api): objects are the plain dicts the launcher sends, the errors are the client's own
`ApiException`. Tests play the Job controller and the kubelet with `run_pod`, `fail_pod`,
`complete`, `finish_deletion` and `pending`. Tolaria may create and delete Secrets but not
read, list or patch them (its Role): the fake has no such methods."""

from __future__ import annotations

import copy
import itertools
import threading
import uuid
from typing import Any

from kubernetes.client.exceptions import ApiException


def _missing(kind: str, name: str) -> ApiException:
    e = ApiException(status=404, reason="Not Found")
    e.body = f'{{"kind": "Status", "message": "{kind} \\"{name}\\" not found"}}'
    return e


def _matches(obj: dict[str, Any], selector: str | None) -> bool:
    labels = obj["metadata"].get("labels") or {}
    for term in filter(None, (selector or "").split(",")):
        k, _, v = term.partition("=")
        if labels.get(k) != v:
            return False
    return True


class FakeKube:
    def __init__(self, namespace: str = "esper") -> None:
        self.namespace = namespace
        self.jobs: dict[str, dict[str, Any]] = {}
        self.secrets: dict[str, dict[str, Any]] = {}
        self.pods: dict[str, dict[str, Any]] = {}
        self.deleted_jobs: list[tuple[str, dict[str, Any]]] = []
        self.calls: list[str] = []
        self.refuse_create: ApiException | None = None
        self._lock = threading.Lock()
        self._n = itertools.count(1)
        self.deployment = {"metadata": {"name": "tolaria", "namespace": namespace, "uid": str(uuid.uuid4())}}

    # ---- AppsV1Api --------------------------------------------------------------------
    def read_namespaced_deployment(self, name: str, namespace: str) -> dict[str, Any]:
        self.calls.append(f"read deployment {name}")
        if name != "tolaria":
            raise _missing("deployments", name)
        return copy.deepcopy(self.deployment)

    # ---- BatchV1Api -------------------------------------------------------------------
    def create_namespaced_job(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self.calls.append(f"create job {body['metadata']['name']}")
            if self.refuse_create is not None:
                raise self.refuse_create
            name = body["metadata"]["name"]
            if name in self.jobs:
                raise ApiException(status=409, reason="AlreadyExists")
            job = copy.deepcopy(body)
            job["metadata"]["uid"] = str(uuid.uuid4())
            job["metadata"]["creationTimestamp"] = f"2026-01-01T00:00:{next(self._n):02d}Z"
            job["status"] = {}
            self.jobs[name] = job
            if not job["spec"].get("suspend"):
                self._new_pod(name, "Pending")
            return copy.deepcopy(job)

    def read_namespaced_job(self, name: str, namespace: str) -> dict[str, Any]:
        with self._lock:
            if name not in self.jobs:
                raise _missing("jobs.batch", name)
            return copy.deepcopy(self.jobs[name])

    def list_namespaced_job(self, namespace: str, label_selector: str | None = None) -> dict[str, Any]:
        with self._lock:
            return {"items": [copy.deepcopy(j) for j in self.jobs.values() if _matches(j, label_selector)]}

    def patch_namespaced_job(self, name: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self.calls.append(f"patch job {name} {body}")
            if name not in self.jobs:
                raise _missing("jobs.batch", name)
            job = self.jobs[name]
            job["spec"].update(copy.deepcopy(body["spec"]))
            if not job["spec"].get("suspend") and not any(
                    p["metadata"]["labels"]["job-name"] == name for p in self.pods.values()):
                self._new_pod(name, "Pending")
            return copy.deepcopy(job)

    def delete_namespaced_job(self, name: str, namespace: str, **kwargs: Any) -> dict[str, Any]:
        with self._lock:
            self.calls.append(f"delete job {name} {sorted(kwargs.items())}")
            if name not in self.jobs:
                raise _missing("jobs.batch", name)
            self.deleted_jobs.append((name, kwargs))
            # Foreground: the Job stays (being deleted) until its pods are gone.
            self.jobs[name]["metadata"]["deletionTimestamp"] = "2026-01-01T01:00:00Z"
            if kwargs.get("grace_period_seconds") == 0:
                self._drop(name)
            return {"kind": "Status", "status": "Success"}

    # ---- CoreV1Api --------------------------------------------------------------------
    def create_namespaced_secret(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            name = body["metadata"]["name"]
            self.calls.append(f"create secret {name}")
            if name in self.secrets:
                raise ApiException(status=409, reason="AlreadyExists")
            self.secrets[name] = copy.deepcopy(body)
            return copy.deepcopy(body)


    def delete_namespaced_secret(self, name: str, namespace: str, **kwargs: Any) -> dict[str, Any]:
        with self._lock:
            self.calls.append(f"delete secret {name}")
            if self.secrets.pop(name, None) is None:
                raise _missing("secrets", name)
            return {"kind": "Status", "status": "Success"}


    def list_namespaced_pod(self, namespace: str, label_selector: str | None = None) -> dict[str, Any]:
        with self._lock:
            return {"items": [copy.deepcopy(p) for p in self.pods.values() if _matches(p, label_selector)]}

    # ---- the Job controller and the kubelet, played by the test -------------------------
    def _new_pod(self, job: str, phase: str) -> dict[str, Any]:
        name = f"{job}-{uuid.uuid4().hex[:5]}"
        labels = dict(self.jobs[job]["spec"]["template"]["metadata"]["labels"])
        labels["job-name"] = job
        pod = {"metadata": {"name": name, "labels": labels,
                            "creationTimestamp": f"2026-01-01T00:{next(self._n):02d}:00Z"},
               "status": {"phase": phase}}
        self.pods[name] = pod
        return pod

    def _current(self, job: str) -> dict[str, Any]:
        live = [p for p in self.pods.values() if p["metadata"]["labels"]["job-name"] == job
                and p["status"]["phase"] in ("Pending", "Running")]
        assert live, f"job {job} has no live pod"
        return live[-1]

    def _drop(self, job: str) -> None:
        self.jobs.pop(job, None)
        for name in [n for n, p in self.pods.items() if p["metadata"]["labels"]["job-name"] == job]:
            del self.pods[name]

    def job(self, attempt: int = 1) -> dict[str, Any]:
        found = [j for j in self.jobs.values() if j["metadata"]["name"].endswith(f"-{attempt}")]
        assert len(found) == 1, list(self.jobs)
        return found[0]

    def run_pod(self, job: str) -> None:
        with self._lock:
            pod = self._current(job)
            pod["status"] = {"phase": "Running"}
            self.jobs[job]["status"]["active"] = 1

    def pending(self, job: str, status: dict[str, Any]) -> None:
        with self._lock:
            self._current(job)["status"] = {"phase": "Pending", **status}

    def fail_pod(self, job: str, reason: str = "OOMKilled", exit_code: int = 137) -> None:
        """The pod dies; the Job makes a new one unless its backoffLimit is used up."""
        with self._lock:
            pod = self._current(job)
            pod["status"] = {"phase": "Failed", "containerStatuses": [
                {"name": "worker", "state": {"terminated": {"reason": reason, "exitCode": exit_code}}}]}
            j = self.jobs[job]
            st = j["status"]
            st["failed"] = st.get("failed", 0) + 1
            if st["failed"] > j["spec"]["backoffLimit"]:
                st.pop("active", None)
                st["conditions"] = [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                     "message": "Job has reached the specified backoff limit"}]
            else:
                self._new_pod(job, "Running")

    def complete(self, job: str) -> None:
        with self._lock:
            self._current(job)["status"] = {"phase": "Succeeded"}
            st = self.jobs[job]["status"]
            st.pop("active", None)
            st["succeeded"] = 1
            st["conditions"] = [{"type": "Complete", "status": "True"}]

    def finish_deletion(self, job: str) -> None:
        """The pod of a Job being deleted is gone: so is the Job."""
        with self._lock:
            self._drop(job)
