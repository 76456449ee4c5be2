"""The recipe grammar (surgery.lark) ships here as package data."""
