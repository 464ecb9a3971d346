"""Containers: find them from the runtime's own state, checkpoint and restore them.

runc is never modified or wrapped: containers are found from runc's ``state.json``
(or containerd through ``ctr``) and ``/proc``; CRIU is driven the way
``runc checkpoint`` drives it. See docs/agent.md.
"""
