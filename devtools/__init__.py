"""Tools for developing and testing tlsoverride that never ship with it (the wheel and the image leave
this package out): the mailcow stand-in, which `make dev` and the tests use in place of a real mailcow."""
