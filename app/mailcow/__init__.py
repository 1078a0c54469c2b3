"""mailcow's tls-policy-map API: the client (`client`, every quirk handled there, its `errors`), the
configured targets (`targets`), names in the map (`dest`), the policies a row can name (`policies`) and
what a row of ours should say (`policy_map`)."""
