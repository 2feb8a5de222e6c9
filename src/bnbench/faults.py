"""A lost peer in plain words: what gloo, NCCL and torch's store say when the other end of a connection went
away, and the sentence bnbench records and shows instead. Stdlib only: shared by dist/ (a launch's output),
store/ (meta.json) and the CLI. (A disk's faults: files.py.)
"""
from __future__ import annotations

LOST_PEER = "a peer process or machine was lost (the connection closed)"
LOST_PEER_TEXT = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "failed to recv, got 0 bytes",
                  "remote process exited or there was a network error")


def lost_peer(error: BaseException) -> bool:
    """Whether a collective failed because a peer process or machine went away (its own output says why)."""
    return isinstance(error, RuntimeError) and any(t in str(error) for t in LOST_PEER_TEXT)
