"""The durable notification pipeline: jobs in, deliveries out, acks and status back."""

from gateway.pipeline.service import Pipeline

__all__ = ["Pipeline"]
