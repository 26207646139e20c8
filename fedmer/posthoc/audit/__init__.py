"""Membership-inference audit of a run's global model: attacks (loss threshold, LiRA), ROC, report."""

from fedmer.posthoc.audit.audit import AuditError, audit_run, format_table
from fedmer.posthoc.audit.roc import AttackResult

__all__ = ["AttackResult", "AuditError", "audit_run", "format_table"]
