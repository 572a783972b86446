"""What the compiled graph calls at run time: scoring/selection custom ops and the KV cache."""
