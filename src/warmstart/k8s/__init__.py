"""Kubernetes integration: the Snapshot resource, the node agent's k8s side, the controller.

* :mod:`warmstart.k8s.contract`  — names: API group, labels, annotations, placeholder files.
* :mod:`warmstart.k8s.resources` — the ``Snapshot`` resource as pydantic models, compatibility.
* :mod:`warmstart.k8s.node`      — the node-local operation API the agent drives (a Protocol).
* :mod:`warmstart.k8s.kube`      — informers, work queue, optimistic-concurrency helpers.
* :mod:`warmstart.k8s.nodeagent` — per-node: claims Snapshots, checkpoints and restores locally.
* :mod:`warmstart.k8s.controller`— cluster-wide: binds and creates Snapshot objects.

Importing this package has no side effects and does not import the ``kubernetes`` client;
the modules that talk to the API server do.
"""
