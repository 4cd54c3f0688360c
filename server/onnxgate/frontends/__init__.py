"""Protocol front ends: translate wire messages to core calls and back."""
