"""Policy: decisions about connections, log-ins and recipients. Never touches sockets."""
