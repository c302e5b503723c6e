#!/usr/bin/env python3
"""Writes a `kubectl get services,endpointslices,nodes -A -o json`-like List of N Services
x E endpoints (with the metadata noise a real API server adds: managedFields, uids,
timestamps, targetRefs), for measuring one-shot commands: scripts/gen-snapshot.py N E > f."""
import json
import sys

n = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
e = int(sys.argv[2]) if len(sys.argv) > 2 else 10
ts = "2026-01-01T00:00:00Z"


def meta(name, ns, uid, labels):
    return {
        "name": name, "namespace": ns, "uid": f"00000000-0000-0000-0000-{uid:012d}",
        "resourceVersion": str(1000 + uid), "creationTimestamp": ts, "labels": labels,
        "managedFields": [{"manager": "kube-controller-manager", "operation": "Update",
                           "apiVersion": "v1", "time": ts, "fieldsType": "FieldsV1",
                           "fieldsV1": {"f:metadata": {"f:labels": {".": {}}}}}],
    }


items = [{
    "apiVersion": "v1", "kind": "Node",
    "metadata": {"name": "node-1", "labels": {"kubernetes.io/hostname": "node-1"}},
    "spec": {"podCIDR": "10.128.1.0/24", "podCIDRs": ["10.128.1.0/24"]},
    "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.2"}],
               "nodeInfo": {"bootID": "x", "kubeletVersion": "v1.34.0"}},
}]
for i in range(n):
    ns, name = f"ns{i % 50}", f"svc{i}"
    ip = f"172.{16 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}"
    svc = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": meta(name, ns, 2 * i, {"app": name}),
        "spec": {"type": "NodePort" if i % 4 == 0 else "ClusterIP", "clusterIP": ip,
                 "clusterIPs": [ip], "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                 "internalTrafficPolicy": "Cluster", "sessionAffinity": "None",
                 "selector": {"app": name},
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}]},
        "status": {"loadBalancer": {}},
    }
    if i % 4 == 0:
        svc["spec"]["ports"][0]["nodePort"] = 30000 + (i % 2000)
        svc["spec"]["externalTrafficPolicy"] = "Cluster"
    items.append(svc)
    eps = []
    for j in range(e):
        k = i * e + j
        eps.append({
            "addresses": [f"10.{128 + (k >> 16)}.{(k >> 8) & 255}.{k & 255}"],
            "conditions": {"ready": True, "serving": True, "terminating": False},
            "nodeName": f"node-{(i + j) % 100}",
            "targetRef": {"kind": "Pod", "name": f"{name}-pod-{j}", "namespace": ns,
                          "uid": f"00000000-0000-0000-0001-{k:012d}"},
        })
    items.append({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": meta(f"{name}-abcde", ns, 2 * i + 1,
                         {"kubernetes.io/service-name": name,
                          "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}),
        "addressType": "IPv4", "endpoints": eps,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    })
json.dump({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}, "items": items},
          sys.stdout)
