"""Topology tools: build random router topologies, compute static routes, draw them, run them on a cluster.

`builder` and `routes` are pure (no kernel, no cluster); `routes.install_routes` and `graph` with a
lab read a running `meshnet.lab.cluster.Lab`; `kube` is the only module here that imports
`kubernetes`, and only when called. Their `meshnetctl` commands are in `meshnet.cli.topo`.
"""
