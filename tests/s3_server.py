"""A real S3 API on loopback for tests: moto's server on 127.0.0.1, started once, stopped after.

Import the fixtures into a test module (``from tests.s3_server import s3, s3_server``). ``s3``
gives each test a fresh bucket and configures everything the way a user would, from the
environment: ``AWS_*`` credentials and ``FSSPEC_S3_ENDPOINT_URL`` for subprocesses (the
``pipeline`` CLI), and fsspec's config for this process (fsspec reads ``FSSPEC_*`` variables only
when it is imported).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import fsspec
import pytest
from moto.server import ThreadedMotoServer  # a test dependency: missing it must fail, not skip

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class S3:
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str
    fs: fsspec.AbstractFileSystem

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def env(self) -> dict[str, str]:
        """Environment variables that point a ``pipeline`` subprocess at this server."""
        return {**CREDENTIALS, "FSSPEC_S3_ENDPOINT_URL": self.endpoint}


@pytest.fixture(scope="session")
def s3_server():
    """The endpoint URL of a moto S3 server on 127.0.0.1 (a free port), for the whole session."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch) -> S3:
    """A fresh bucket on the loopback server, with credentials and endpoint set as a user would."""
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", s3_server)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": s3_server})
    fs = fsspec.filesystem("s3", endpoint_url=s3_server)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    return S3(s3_server, bucket, fs)
