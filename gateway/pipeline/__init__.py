"""The durable notification pipeline: jobs in, deliveries out, acks and status back.

The service (:class:`gateway.pipeline.service.Pipeline`) is not imported here: CLI commands
use the pipeline's table modules (``registry``, ``jobs``, ``deliveries``) alone, and the
service brings the dispatcher, the MQTT client and the bridges with it.
"""
