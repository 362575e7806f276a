"""Identity, authorization, tenancy, quotas, usage and audit."""
