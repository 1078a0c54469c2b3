"""mailcow's tls-policy-map API: the client (`client`, every quirk handled there), the configured
targets (`targets`) and a test double (`standin`)."""
