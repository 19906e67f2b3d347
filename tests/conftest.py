"""Fixtures shared by the tests."""

import socket

import pytest


@pytest.fixture
def no_network(monkeypatch):
  """Makes every socket connection fail, so a test proves it needs no network."""

  def refuse(*args, **kwargs):
    raise OSError("this test must not use the network")

  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket.socket, "connect_ex", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)
