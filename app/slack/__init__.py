"""Slack in the service: Block Kit notifications, the interactivity endpoint (Approve / Reject
buttons) and the `/tlso` slash command, every request verified with Slack's signing secret."""
