"""``warmstart agent``: the node agent daemon (HTTP/JSON on a unix socket). See docs/agent.md."""
