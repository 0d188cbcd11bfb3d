"""etcd3 on the installed (newest) protobuf, with the fast backend and no global switch."""

import os
import subprocess
import sys
import textwrap

import pytest
from google.protobuf import __version__ as protobuf_version

PROTOBUF_MAJOR = int(protobuf_version.split(".")[0])


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, env=env, timeout=60,
    )


@pytest.mark.skipif(PROTOBUF_MAJOR < 4, reason="old protobuf accepts etcd3's generated code")
def test_plain_etcd3_import_fails_on_this_protobuf():
    # Proves the compatibility layer is needed here, so the next test means something.
    result = run_python("import etcd3")
    assert result.returncode != 0
    assert "Descriptors cannot be created directly" in result.stderr


def test_etcd3_works_through_rdzv_with_upb(etcd_endpoint):
    result = run_python(f"""
        import os, sys
        import rdzv
        from google.protobuf.internal import api_implementation
        from rdzv.client import EtcdClient, EtcdConfig, parse_endpoints
        assert "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION" not in os.environ
        client = EtcdClient(EtcdConfig(endpoints=tuple(parse_endpoints({etcd_endpoint!r}))))
        etcd = client.etcd3
        etcd.put("/compat/key", "value")
        value, _ = etcd.get("/compat/key")
        assert value == b"value", value
        ok, _ = etcd.transaction(
            compare=[etcd.transactions.version("/compat/key") > 0],
            success=[etcd.transactions.delete("/compat/key")], failure=[])
        assert ok
        print(api_implementation.Type())
        client.close()
    """)
    assert result.returncode == 0, result.stderr
    backend = result.stdout.strip()
    if PROTOBUF_MAJOR >= 4:
        assert backend == "upb"


def test_other_protobuf_users_are_unaffected():
    # Code that builds its own messages after rdzv loaded etcd3 sees the normal
    # backend and its own descriptors work as usual.
    result = run_python("""
        import rdzv.client
        rdzv.client.load_etcd3()
        from google.protobuf import descriptor_pb2, timestamp_pb2
        from google.protobuf.internal import api_implementation
        ts = timestamp_pb2.Timestamp(seconds=5)
        assert timestamp_pb2.Timestamp.FromString(ts.SerializeToString()).seconds == 5
        import etcd3
        req = etcd3.etcdrpc.RangeRequest(key=b"k", limit=3)
        assert etcd3.etcdrpc.RangeRequest.FromString(req.SerializeToString()).limit == 3
        print(api_implementation.Type())
    """)
    assert result.returncode == 0, result.stderr
