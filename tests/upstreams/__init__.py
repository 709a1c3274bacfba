"""Local HTTP servers speaking providers' documented wire formats, used as upstreams in tests."""
