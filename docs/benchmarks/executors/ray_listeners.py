"""Which addresses a local Ray cluster listens on when asked to stay on loopback (why the
benchmark's distributed executor uses Dask instead). Needs ``pip install ray``; Ray is not a
dependency of shallowmark.

    python docs/benchmarks/executors/ray_listeners.py > docs/benchmarks/executors/ray_listeners.txt
"""
import psutil
import ray


def listeners(label: str) -> None:
    me = psutil.Process()
    procs = {p.pid: p for p in [me] + me.children(recursive=True)}
    for c in sorted(psutil.net_connections(kind="inet"), key=lambda c: (c.laddr.ip, c.laddr.port)):
        if c.status == psutil.CONN_LISTEN and c.pid in procs:
            print(f"{label}: {c.laddr.ip}:{c.laddr.port} {procs[c.pid].name()}")


if __name__ == "__main__":
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    print(f"ray {ray.__version__}, ray.init(num_cpus=2, include_dashboard=False, _node_ip_address='127.0.0.1')")
    assert ray.get(ray.remote(lambda x: 2 * x).remote(21)) == 42
    listeners("ray")
    ray.shutdown()

    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None) as cl, \
            Client(cl) as client:
        import distributed

        print(f"distributed {distributed.__version__}, LocalCluster(n_workers=2, host='127.0.0.1', dashboard_address=None)")
        assert client.submit(lambda x: 2 * x, 21).result() == 42
        listeners("dask")
