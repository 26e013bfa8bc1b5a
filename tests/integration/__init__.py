"""Tests with real servers and real client libraries."""
