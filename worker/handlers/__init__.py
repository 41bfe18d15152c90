"""The built-in task handlers, registered under the `forseti.handlers` entry points."""
