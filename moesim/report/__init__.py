"""Figures, terminal tables and trace exports."""
