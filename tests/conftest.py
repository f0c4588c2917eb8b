"""Test setup: 4 CPU devices so sharding and resharding are tested without accelerators,
and a moto S3 server for s3:// tests."""

import logging
import os
import uuid

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)


@pytest.fixture
def no_orbax_reads(monkeypatch):
  """Fails the test if a jaxckpt restore asks Orbax to read: the fast path must do it all."""
  from jaxckpt import _layout

  def refuse(*args, **kwargs):
    raise AssertionError("Orbax was asked to read")

  monkeypatch.setattr(_layout, "_orbax_read", refuse)


@pytest.fixture(scope="session")
def s3_endpoint():
  """A moto S3 server on 127.0.0.1 (a free port), shared by the whole session."""
  from moto.server import ThreadedMotoServer

  logging.getLogger("werkzeug").setLevel(logging.ERROR)
  server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
  server.start()
  host, port = server.get_host_and_port()
  yield f"http://{host}:{port}"
  server.stop()


@pytest.fixture
def s3(s3_endpoint, monkeypatch):
  """Points s3:// at the moto server and creates a fresh bucket: (boto3 client, bucket)."""
  import boto3

  for key, value in {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_ENDPOINT_URL": s3_endpoint,
  }.items():
    monkeypatch.setenv(key, value)
  bucket = f"test-{uuid.uuid4().hex[:12]}"
  client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
  client.create_bucket(Bucket=bucket)
  return client, bucket
