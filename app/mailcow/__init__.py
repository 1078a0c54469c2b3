"""mailcow's API: the client (`client`, every quirk handled there, its `errors` and the `checks` it makes
before sending), the configured targets (`targets`), names in the map (`dest`), the policies a row can
name (`policies`), what a row of ours should say (`policy_map`), and the mail queue as we keep it
(`queue`, domains only) with its answers (`mailq`)."""
