"""Who is calling: API keys → principals. Runs at the HTTP edge, before the body is even read, so an
unauthenticated caller costs no parsing and always gets 401 rather than a validation error."""
