class InvalidInput(ValueError):
    """Input a kernel refuses; the message is meant for the API caller.

    Never put exception text of a third-party library into the message: say
    what is wrong with the input in our own words.
    """
