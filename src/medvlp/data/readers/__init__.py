"""Readers: one function per raw dataset layout, turning it into ``prepare.Example`` items."""
