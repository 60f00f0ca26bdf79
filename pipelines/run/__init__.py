"""The Ray wiring of a job: resolve the spec, connect to the cluster, prepare each scene, stream
its chunks through the stages (read -> predict -> write + partial stats) on one of two pool
layouts, and finish each scene (merge, tables, complete)."""
