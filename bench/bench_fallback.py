"""Cloud fallback round trip vs the model's own compute and vs a bare paho request/response.

Starts two real Mosquitto brokers on loopback: the fleet broker (mutual TLS, fleet ACLs, via
``fleetbench``) and a plain-TCP one (anonymous, ``set_tcp_nodelay true``). On each it measures,
with the digits MLP served by a ``FallbackWorker`` (onnxruntime):

* ``compute``: ``CloudModel.run`` alone (the model's own cost, preprocessing included);
* ``bare paho``: a bare paho MQTT v5 request/response (QoS 1, response topic, correlation data,
  TCP_NODELAY) with an echo responder: the floor any MQTT request/response pays here;
* ``fallback``: ``MqttFallbackTransport.request`` -> broker -> ``FallbackWorker`` -> broker.

``overhead = fallback - compute`` (p50/p99). Over plain TCP the adapters' TLS is switched off
by clearing paho's TLS flag on the already-built client (bench only; production is TLS-only).

    .venv/bin/python bench/bench_fallback.py --n 2000 --markdown
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fleetbench
from edge_agent.common.mqtt import MqttClient
from edge_agent.common.mqtt_types import MqttConfig
from edge_agent.serving.fallback_mqtt import MqttFallbackTransport
from edge_agent.wire.topics import Topics
from fleet_server.fallback.cloud_models import CloudModel, CloudModels
from fleet_server.fallback.worker import FallbackWorker


def _digits(tmp: Path) -> tuple[dict[str, CloudModel], np.ndarray]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from bundles import build_digits_bundles

    b = build_digits_bundles(tmp / "bundles")
    models = CloudModels.from_bundles([b.path(1)], b.keys.trusted_root(), now=datetime.now(UTC))
    return models, b.x_eval[:1]


def _q(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs) * 1000
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def _plain_broker(tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = fleetbench.free_port()
    conf = tmp / "plain.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
        "persistence false\n" + ("user root\n" if __import__("os").geteuid() == 0 else "")
    )
    proc = subprocess.Popen([fleetbench.MOSQUITTO, "-c", str(conf)], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    import socket

    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("plain mosquitto did not start")


def _client(host: str, port: int, ident: str, creds: Any, tls: bool, **kw: Any) -> MqttClient:
    cfg = MqttConfig(
        host=host,
        port=port,
        device_id=ident,
        ca_path=Path(creds.ca),
        cert_path=Path(creds.cert),
        key_path=Path(creds.key),
        session_expiry=0,
        **kw,
    )
    c = MqttClient(cfg)
    if not tls:
        c._client._ssl = False  # bench only: same adapter, no TLS
        c._client._ssl_context = None
    c.connect()
    c.wait_connected(10)
    return c


def _bare(host: str, port: int, creds: Any, tls: bool, n: int, device: str) -> list[float]:
    """Bare paho request/response: requester + echo responder, QoS 1, TCP_NODELAY."""
    import socket

    from paho.mqtt import client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    topics = Topics()
    req_t, resp_t = topics.fallback_req(device), topics.fallback_resp(device, "bare")

    def make(cid: str, cred: Any) -> Any:
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=cid, protocol=MQTTProtocolVersion.MQTTv5
        )
        if tls:
            c.tls_set(cred.ca, cred.cert, cred.key)
        c.on_socket_open = lambda _c, _u, s: s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return c

    got = threading.Event()
    resp = make(fleetbench.SERVER, creds[fleetbench.SERVER])
    dev = make(device, creds[device])

    def echo(c: Any, _u: Any, m: Any) -> None:
        p = Properties(PacketTypes.PUBLISH)
        p.CorrelationData = m.properties.CorrelationData
        c.publish(m.properties.ResponseTopic, m.payload, 1, properties=p)

    resp.on_message = echo
    dev.on_message = lambda _c, _u, _m: got.set()
    out: list[float] = []
    for c, sub in ((resp, req_t), (dev, resp_t)):
        c.connect("127.0.0.1", port)
        c.loop_start()
        c.subscribe(sub, 1)
    time.sleep(0.5)
    payload = np.zeros((1, 64), np.float32).tobytes()
    for _ in range(n):
        p = Properties(PacketTypes.PUBLISH)
        p.ResponseTopic, p.CorrelationData = resp_t, uuid.uuid4().bytes
        got.clear()
        t = time.perf_counter()
        dev.publish(req_t, payload, 1, properties=p)
        if not got.wait(2):
            raise RuntimeError("bare request/response timed out")
        out.append(time.perf_counter() - t)
    for c in (resp, dev):
        c.loop_stop()
        c.disconnect()
    return out


def run(n: int) -> list[tuple[str, float, float]]:
    """Rows of (label, p50 ms, p99 ms)."""
    rows: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        models, x = _digits(tmp)
        model = models["digits"]
        compute: list[float] = []
        for _ in range(n):
            t = time.perf_counter()
            model.run({"input": x})
            compute.append(time.perf_counter() - t)
        c50, c99 = _q(compute)
        rows.append(("model compute (onnxruntime, 1 row)", c50, c99))
        ca, creds = fleetbench.make_pki(tmp / "pki", ["dev-a"])
        tls_broker = fleetbench.Broker.create(tmp, ca, creds[fleetbench.SERVER])
        tls_broker.start()
        plain, plain_port = _plain_broker(tmp)
        try:
            for label, port, tls in (
                ("plain TCP", plain_port, False),
                ("mutual TLS", tls_broker.port, True),
            ):
                b50, b99 = _q(_bare("127.0.0.1", port, creds, tls, n, "dev-a"))
                rows.append((f"bare paho request/response, {label}", b50, b99))
                server = _client(
                    "127.0.0.1",
                    port,
                    fleetbench.SERVER,
                    creds[fleetbench.SERVER],
                    tls,
                    announce_status=False,
                    clean_start=True,
                )
                dev = _client("127.0.0.1", port, "dev-a", creds["dev-a"], tls)
                worker = FallbackWorker(server, models, Topics(), "bench")
                worker.start()
                transport = MqttFallbackTransport(dev, Topics(), "dev-a")
                for _ in range(50):  # warm-up (first request subscribes the response topic)
                    transport.request("digits", {"input": x}, deadline_s=2.0, reason="bench")
                rt: list[float] = []
                for _ in range(n):
                    t = time.perf_counter()
                    transport.request("digits", {"input": x}, deadline_s=2.0, reason="bench")
                    rt.append(time.perf_counter() - t)
                f50, f99 = _q(rt)
                rows.append((f"fallback round trip, {label}", f50, f99))
                # Overhead: percentile of the round trip minus the same percentile of compute.
                rows.append((f"fallback overhead over compute, {label}", f50 - c50, f99 - c99))
                worker.close()
                dev.close()
                server.close()
        finally:
            plain.terminate()
            plain.wait(5)
            tls_broker.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="requests per row (bounded to 20000)")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    rows = run(max(10, min(args.n, 20000)))
    if args.markdown:
        print(f"`.venv/bin/python bench/bench_fallback.py --n {args.n} --markdown`\n")
        print("| measurement | p50 ms | p99 ms |\n|---|---:|---:|")
        for label, p50, p99 in rows:
            print(f"| {label} | {p50:.3f} | {p99:.3f} |")
    else:
        for label, p50, p99 in rows:
            print(f"{label:48s} p50 {p50:7.3f} ms  p99 {p99:7.3f} ms")


if __name__ == "__main__":
    main()
