"""Mojo kernel sources (one Mojo package per folder), shipped as package data."""
