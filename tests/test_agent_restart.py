"""kill -9 of a running agent process and its restart on the same state directory.

R0 - R1 - R2 in a line, R1 run as a real ``qkdsdn agent`` process (mutual TLS), the twin and
R0, R2 in this process. R1 is the slave end of R0-R1, the master end of R1-R2, the trusted
node of R0 -> R2 and an endpoint of ETSI 014 pairs both ways. It is killed with SIGKILL while
keys are being relayed through it and started again. Checked from the key stores of both
ends of each link: every key is accounted for (available + consumed == stored per owner;
the two ends hold the same keys with the same owners), no byte the receiving end consumed
was left unconsumed by its owner (nothing spent twice), no relay message was ever rejected
(a reused range would be), the keys the applications got before and after are all
different, and after the restart keys delivered before the crash are still there for the
slave application, and new sessions give identical keys at both ends."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid

import pytest
import requests

from agent_harness import Network, relocate
from agents import relay
from agents.client import ETSI004Error, ETSI014Error, QoS
from agents.keystore import KeyStore

NETWORK = """\
network: {name: restart}
nodes:
  - {name: R0, km_address: "127.0.0.1:1"}
  - {name: R1, km_address: "127.0.0.1:2"}
  - {name: R2, km_address: "127.0.0.1:3"}
links:
  - {name: R0-R1, ends: [R0, R1], length_km: 5, device: {model: fixed, skr_bps: 400000, qber: 0.01}}
  - {name: R1-R2, ends: [R1, R2], length_km: 5, device: {model: fixed, skr_bps: 400000, qber: 0.01}}
users:
  - name: tenant
    sla: {max_priority: 7, max_bps: 1000000, max_sessions: 32, bucket_bits: 1048576}
applications:
  - {sae_id: SAE-R0, node: R0, user: tenant}
  - {sae_id: SAE-R1, node: R1, user: tenant}
  - {sae_id: SAE-R1-B, node: R1, user: tenant}
  - {sae_id: SAE-R2, node: R2, user: tenant}
"""
LOAD_MAX_CALLS, LOAD_MAX_S = 300, 20.0
NEEDED = relay.link_key_bits_needed(256)  # link-key bits of one 256-bit key on one link
START_LIMIT_S = 30.0


class AgentProcess:
    """``qkdsdn agent`` of one node as a child process."""

    def __init__(self, net: Network, node: str, state_dir):
        self.net, self.node, self.state_dir = net, node, state_dir
        self.proc: subprocess.Popen | None = None
        self.log = open(state_dir.parent / f"{node}.process.log", "ab")  # noqa: SIM115

    def start(self) -> None:
        code = "import sys; from qkdsdn.cli import main; sys.exit(main(sys.argv[1:]))"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, "agent", str(self.net.path), "--node", self.node,
             "--pki", str(self.net.state / "pki"), "--state-dir", str(self.state_dir), "--log-level", "WARNING"],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        http = self.net.session("controller")
        deadline = time.monotonic() + START_LIMIT_S
        while True:
            assert self.proc.poll() is None, f"agent {self.node} exited with {self.proc.returncode}"
            try:
                if http.get(self.net.url(self.node) + "/restconf/data/etsi-qkd-sdn-node:qkd_node",
                            timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"agent {self.node} did not start serving"
            time.sleep(0.1)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=30) == -signal.SIGKILL

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.log.close()


def wait_until(condition, what: str, limit_s: float = 30.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def link_rows(path, link: str) -> dict[str, tuple[str, str, int, str]]:
    """key_ID -> (owner, state, size, consumed ranges) of one link's pool in a key store file."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return {kid: (owner, state, size, ranges) for kid, owner, state, size, ranges in db.execute(
            "SELECT key_id, owner, state, size, ranges FROM link_keys WHERE link=?", (link,))}
    finally:
        db.close()


def ranges(text: str) -> set[int]:
    out: set[int] = set()
    for part in filter(None, text.split(",")):
        a, b = map(int, part.split("-"))
        out.update(range(a, b))
    return out


def check_pools(net: Network, r1_store_path) -> dict[str, int]:
    """The two ends of each of R1's links agree; returns the bits each owner spent that its peer
    never consumed (material lost with messages in flight, never reused)."""
    paths = {"R0": net.agents["R0"].store.path, "R2": net.agents["R2"].store.path, "R1": r1_store_path}
    holes = {}
    for a, b in (("R0", "R1"), ("R1", "R2")):
        link = net.link(a, b)
        master, slave = link.master, link.slave
        at = {master: link_rows(paths[master], link.qkdl_id), slave: link_rows(paths[slave], link.qkdl_id)}
        # Keys the slave holds are known to the master with the same owner and size; keys the master
        # may spend (available) the slave holds.
        for kid, (owner, state, size, _) in at[slave].items():
            assert kid in at[master], f"{link.name}: {kid} at the slave only"
            assert at[master][kid][0] == owner and at[master][kid][2] == size
        for kid, (owner, state, size, _) in at[master].items():
            if state != "pending":
                assert kid in at[slave], f"{link.name}: {kid} available at the master, unknown to the slave"
        lost = 0
        for kid, (owner, state, size, used_text) in at[slave].items():
            spender, receiver = (master, slave) if owner == "master" else (slave, master)
            spent = ranges(at[spender][kid][3]) if at[spender][kid][1] != "consumed" else set(range(size))
            received = ranges(at[receiver][kid][3]) if at[receiver][kid][1] != "consumed" else set(range(size))
            assert received <= spent, f"{link.name}: bytes of {kid} consumed by the receiver but not the owner"
            lost += 8 * len(spent - received)
        holes[link.name] = lost
    for name, path in paths.items():
        store = net.agents[name].store if name != "R1" else KeyStore(path)
        try:
            for link_id, entry in store.stats().items():
                for owner in ("master", "slave"):
                    e = entry[owner]
                    assert e["available"] + e["consumed"] == e["stored"], (name, link_id, owner, e)
        finally:
            if name == "R1":
                store.close()
    return holes


@pytest.fixture()
def net(tmp_path):
    (tmp_path / "source.yaml").write_text(NETWORK)
    path = relocate(tmp_path / "source.yaml", tmp_path / "net.yaml")
    with Network(path, tmp_path, tls=True, nodes=["R0", "R2"]) as network:
        yield network


def start_r1(net: Network, tmp_path, pool_bits: int) -> AgentProcess:
    """R1 as a process, once the pools of R0 and R2 towards it hold ``pool_bits``."""
    r1 = AgentProcess(net, "R1", tmp_path / "R1-process")
    try:
        r1.start()
        r0_r1, r1_r2 = net.link("R0", "R1").qkdl_id, net.link("R1", "R2").qkdl_id
        wait_until(lambda: net.agents["R0"].store.available_bits(r0_r1) >= pool_bits
                   and net.agents["R2"].store.available_bits(r1_r2) >= pool_bits, "the pools to fill")
    except BaseException:
        r1.stop()
        raise
    return r1


def test_kill_9_and_restart_loses_and_reuses_no_key(net, tmp_path):
    r1 = None
    r1_store = tmp_path / "R1-process" / "R1.keystore.sqlite"
    delivered: list[bytes] = []  # every key any application got, before and after
    try:
        r1 = start_r1(net, tmp_path, 65536)
        a0, a1, a2 = (net.client(s) for s in ("SAE-R0", "SAE-R1", "SAE-R2"))

        # Before: R1 the destination of a pair (two keys left for after the restart), the source of another.
        to_r1 = a0.enc_keys("SAE-R1", number=4)
        assert a1.dec_keys("SAE-R0", [k for k, _ in to_r1[:2]]) == to_r1[:2]
        from_r1 = a1.enc_keys("SAE-R2", number=3)
        assert a2.dec_keys("SAE-R1", [k for k, _ in from_r1]) == from_r1
        delivered += [k for _, k in to_r1[:2] + from_r1]
        # Multicast to both applications of R1 and to R2: R1's copies wait across the crash.
        group = a0.enc_keys("SAE-R1", number=2, additional_slave_sae_ids=["SAE-R1-B", "SAE-R2"])
        assert a2.dec_keys("SAE-R0", [k for k, _ in group]) == group
        delivered += [k for _, k in group]

        # Relayed through R1 while it is killed.
        progress, failures = [], []

        def load() -> None:
            started = time.monotonic()
            while len(progress) < LOAD_MAX_CALLS and time.monotonic() - started < LOAD_MAX_S:
                try:
                    keys = a0.enc_keys("SAE-R2", number=2)
                except (ETSI014Error, requests.RequestException) as exc:
                    failures.append(exc)
                    return
                progress.append(keys)

        loader = threading.Thread(target=load)
        loader.start()
        wait_until(lambda: len(progress) >= 5 or failures or not loader.is_alive(), "relayed keys")
        r1.kill()
        loader.join(timeout=60)
        assert not loader.is_alive() and len(progress) >= 5
        made = [k for batch in progress for k in batch]
        got = a2.dec_keys("SAE-R0", [k for k, _ in made])
        assert got == made
        delivered += [k for _, k in made]

        holes_at_kill = check_pools(net, r1_store)
        # Lost at most with the messages in flight: one enc_keys call of two keys on each link.
        assert all(bits <= 2 * NEEDED for bits in holes_at_kill.values()), holes_at_kill

        # Restart on the same state directory.
        r1.start()
        # The keys R1 stored for SAE-R1 before the crash are still there for it (and only for it), once.
        with pytest.raises(ETSI014Error) as intruder:
            net.client("SAE-R1-B").dec_keys("SAE-R0", [to_r1[2][0]])
        assert intruder.value.status == 401
        assert a1.dec_keys("SAE-R0", [k for k, _ in to_r1[2:]]) == to_r1[2:]
        with pytest.raises(ETSI014Error) as again:
            a1.dec_keys("SAE-R0", [to_r1[2][0]])
        assert again.value.status == 400
        delivered += [k for _, k in to_r1[2:]]
        # Each application of R1 gets the multicast keys made before the crash, under their key_IDs, once.
        for sae in ("SAE-R1", "SAE-R1-B"):
            assert net.client(sae).dec_keys("SAE-R0", [k for k, _ in group]) == group
            with pytest.raises(ETSI014Error) as again:
                net.client(sae).dec_keys("SAE-R0", [group[0][0]])
            assert again.value.status == 400

        # New keys through and from the restarted agent: identical at both ends.
        for master, slave, m, s in ((a0, a1, "SAE-R0", "SAE-R1"), (a1, a2, "SAE-R1", "SAE-R2"),
                                    (a0, a2, "SAE-R0", "SAE-R2")):
            keys = enc_after_restart(master, s)
            assert slave.dec_keys(m, [k for k, _ in keys]) == keys
            delivered += [k for _, k in keys]
        ksid = str(uuid.uuid4())
        opened: dict[str, int] = {}

        def open_(client, sae) -> None:
            opened[sae] = client.open_connect("SAE-R0", "SAE-R2", QoS(Key_chunk_size=32, Timeout=15_000), ksid).status

        threads = [threading.Thread(target=open_, args=(c, s)) for c, s in ((a0, "SAE-R0"), (a2, "SAE-R2"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert opened == {"SAE-R0": 0, "SAE-R2": 0}
        mine = [a0.get_key(ksid, metadata_size=64) for _ in range(3)]
        theirs = [a2.get_key(ksid, index=i, metadata_size=64) for i in range(3)]
        assert [k.status for k in mine + theirs] == [0] * 6
        assert [k.key for k in mine] == [k.key for k in theirs]
        assert {k.metadata["hops"] for k in mine + theirs} == {1}
        delivered += [k.key for k in mine]

        # Nothing was handed out twice and no relay message was ever refused.
        assert len(set(delivered)) == len(delivered)
        for name in ("R0", "R2"):
            assert [e for e in net.agents[name].events if e["kind"] == "relay_rejected"] == []
        r1.stop()
        holes_after = check_pools(net, r1_store)
        # Material lost with the messages in flight at the kill stays lost, and only that.
        assert holes_after == holes_at_kill
    finally:
        if r1 is not None:
            r1.stop()


def enc_after_restart(client, slave: str, attempts: int = 3) -> list[tuple[str, bytes]]:
    """enc_keys right after the restart: a pair whose route the crash broke may be refused once
    (503) while the source tears the old session down; the next call opens a new one."""
    for attempt in range(attempts):
        try:
            return client.enc_keys(slave, number=2)
        except ETSI014Error as exc:
            if exc.status != 503 or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def open_pair(source, destination, src_sae: str, dst_sae: str) -> str:
    """Both applications of an ETSI 004 session open it at once; returns its KSID."""
    ksid = str(uuid.uuid4())
    opened: dict[str, int] = {}

    def run(client, sae) -> None:
        opened[sae] = client.open_connect(src_sae, dst_sae, QoS(Key_chunk_size=32, Timeout=15_000), ksid).status

    threads = [threading.Thread(target=run, args=(c, s)) for c, s in ((source, src_sae), (destination, dst_sae))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert opened == {src_sae: 0, dst_sae: 0}
    return ksid


def test_etsi004_sessions_survive_a_kill_9_of_an_endpoint_and_of_a_trusted_node(net, tmp_path):
    """R1 is the destination of R0 -> R1, the source of R1 -> R2 and the trusted node of
    R0 -> R2. After its kill -9 and restart every session goes on under its KSID: keys stored
    before are delivered once, automatic indices continue after the last one handed out, both
    ends get identical keys, and R1's RESTCONF shows the sessions again."""
    r1 = None
    try:
        r1 = start_r1(net, tmp_path, 16384)
        a0, a1, a2 = (net.client(s) for s in ("SAE-R0", "SAE-R1", "SAE-R2"))
        to_r1, from_r1, through = open_pair(a0, a1, "SAE-R0", "SAE-R1"), open_pair(a1, a2, "SAE-R1", "SAE-R2"), \
            open_pair(a0, a2, "SAE-R0", "SAE-R2")
        before = {ksid: [src.get_key(ksid) for _ in range(3)]
                  for ksid, src in ((to_r1, a0), (from_r1, a1), (through, a0))}
        assert all(k.status == 0 for keys in before.values() for k in keys)
        assert a1.get_key(to_r1, index=0).key == before[to_r1][0].key  # R1 delivers one before the kill
        assert [a2.get_key(from_r1, index=i).key for i in range(3)] == [k.key for k in before[from_r1]]

        r1.kill()
        r1.start()
        http = net.session("controller")
        apps = http.get(net.url("R1") + "/restconf/data/etsi-qkd-sdn-node:qkd_node/qkd_applications",
                        timeout=10).json()["etsi-qkd-sdn-node:qkd_applications"]["qkd_app"]
        assert {to_r1, from_r1, through} <= {a["app_id"] for a in apps}

        # R1 as destination: the keys stored before are there once; the next automatic index follows.
        assert [a1.get_key(to_r1, index=i).key for i in (1, 2)] == [k.key for k in before[to_r1][1:]]
        with pytest.raises(ETSI004Error) as again:
            a1.get_key(to_r1, index=0)
        assert again.value.status == 409
        later = a0.get_key(to_r1)
        assert later.status == 0 and later.index == 3 and a1.get_key(to_r1).key == later.key
        # R1 as source: its application goes on where it was, the peer gets the same keys.
        nxt = a1.get_key(from_r1)
        assert nxt.status == 0 and nxt.index == 3 and a2.get_key(from_r1, index=3).key == nxt.key
        # R1 as trusted node: relaying goes on.
        relayed = a0.get_key(through)
        assert relayed.status == 0 and relayed.index == 3 and a2.get_key(through, index=3).key == relayed.key
        assert [a2.get_key(through, index=i).key for i in range(3)] == [k.key for k in before[through]]
        for name in ("R0", "R2"):
            assert not [e for e in net.agents[name].events
                        if e["kind"] in ("route_broken", "relay_rejected") and e["ksid"] in (to_r1, from_r1, through)]
        # Closing releases the route everywhere, R1's restored sessions included.
        for ksid, src, dst in ((to_r1, a0, a1), (from_r1, a1, a2), (through, a0, a2)):
            assert (src.close(ksid), dst.close(ksid)) == (0, 0)
    finally:
        if r1 is not None:
            r1.stop()
