"""A minimal CRI client (runtime.v1 sandboxes) for driving containerd in the suite; see api.proto."""
