"""What every dgdm package shares and none owns: the error root and the small checks that
the JSON parsers of all three apply. Imports nothing from dgdm."""
