"""mailcow's tls-policy-map API: the client (`client`, every quirk handled there), the configured
targets (`targets`) and the rules for names in the map (`dest`)."""
