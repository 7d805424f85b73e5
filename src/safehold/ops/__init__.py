"""Operations: backup, restore, check and browsing, each reporting through event callbacks."""
