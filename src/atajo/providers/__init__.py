"""Provider adapters (one file per wire format) and the pooled HTTP client they share."""
