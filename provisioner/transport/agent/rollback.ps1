# rollback: undo the workstation's last run on the requested files. Each file's history says
# which run wrote it last; the newest of those runs is undone, file by file and in order: a
# file it created is removed, a file it replaced gets backup.1 back, the others stay unchanged.
$Request = $args[0]

function Get-LastWrite($Checked) {
    # The newest write of the tool to the file: the first entry of its history. A state an
    # older agent kept (no history) counts its backup.1 as the write of a run older than any
    # recorded one. $null: nothing to undo.
    $state = Get-StateFolder $Checked.sid ([IO.Path]::GetFileName($Checked.path))
    $history = Get-WriteHistory $state
    if ($null -ne $history) {
        if ($history.Count -eq 0) { return $null }
        return $history[0]
    }
    if ($null -eq (Read-StateFile $state 'backup.1')) { return $null }
    return [pscustomobject]@{ ticks = [long]0; run = ''; action = 'replaced'; before = '-'; path = '' }
}

function Find-LastWrite($Checked, $Roots) {
    # Get-LastWrite once a write whose agent died is settled (a backup.new waits): it may
    # not have happened. Best effort: the file's undo, if it comes to that, meets any failure.
    $state = Get-StateFolder $Checked.sid ([IO.Path]::GetFileName($Checked.path))
    if ($null -ne (Read-StateFile $state 'backup.new')) {
        try {
            $prepared = Initialize-ManagedFile $Checked $Roots
            Unlock-Folders $prepared.locks
        } catch { }
    }
    return Get-LastWrite $Checked
}

function Read-OwnFile([string]$Path) {
    # The bytes of a file the agent created, read through a handle. A file a user made in its
    # place is theirs (they cannot give it to SYSTEM, Administrators or the agent), and refused.
    $stream = Open-PlainFile $Path
    try {
        $owner = $stream.GetAccessControl().GetOwner([System.Security.Principal.SecurityIdentifier]).Value
        if ((Get-TrustedOwners) -notcontains $owner) {
            throw (New-AgentException 'unsafe-path' ("{0} is owned by {1}: not the file the tool created; nothing was removed." -f $Path, $owner))
        }
        $bytes = Read-Stream $stream
    } finally {
        $stream.Dispose()
    }
    return , $bytes
}

function Invoke-PreparedRemoval($Checked, $Prepared, $Item, [string]$IfRunning, $Context) {
    # The run created the file: it goes, its content kept as rolled-back. Checked before
    # anybody's MicroSIP is stopped, and again through the handle it is read with.
    $path = $Checked.path
    $rolledBack = [IO.Path]::Combine($Prepared.state, 'rolled-back')
    if (-not [IO.File]::Exists($path)) {
        Remove-FileQuietly $rolledBack
        $Item['status'] = 'removed'
        return
    }
    $null = Read-OwnFile $path
    if (-not (Invoke-RunningPolicy $Checked $IfRunning $Item $Context)) { return }
    $old = Read-OwnFile $path
    $Item['old_sha256'] = Get-Sha256 $old
    try {
        Write-StateFile $Prepared.state 'rolled-back' $old
        $Item['backup'] = $rolledBack
        # A name in a locked folder, checked again: deleting it never reaches another file.
        Assert-SafePath $path $Prepared.start
        [IO.File]::Delete($path)
    } catch {
        $Item['backup'] = $null
        Remove-FileQuietly $rolledBack
        throw
    }
    $Item['status'] = 'removed'
}

function Invoke-PreparedRestore($Checked, $Prepared, $Item, [string]$IfRunning, $Context, $Write) {
    # The run replaced the file: backup.1, which must hold what it replaced, goes back.
    $path = $Checked.path
    $state = $Prepared.state
    $backup1 = [IO.Path]::Combine($state, 'backup.1')
    if (-not [IO.File]::Exists($backup1)) {
        throw (New-AgentException 'no-backup' ("there is no backup of {0} to restore." -f $path))
    }
    $content = [IO.File]::ReadAllBytes($backup1)
    if ($Write.before -cne '-' -and (Get-Sha256 $content) -cne $Write.before) {
        throw (New-AgentException 'no-backup' ("the backup of {0} is not what run {1} replaced; nothing was restored." -f $path, $Write.run))
    }
    if (-not (Invoke-RunningPolicy $Checked $IfRunning $Item $Context)) { return }

    # The current content goes to rolled-back (for SYSTEM and Administrators only), then
    # backup.1's content replaces the file as an apply would write it, and is verified.
    $rolledBack = [IO.Path]::Combine($state, 'rolled-back')
    $old = Read-HeldFile $path
    $previous = $null
    try {
        if ($null -ne $old) {
            $Item['old_sha256'] = Get-Sha256 $old
            Write-StateFile $state 'rolled-back' $old
            $Item['backup'] = $rolledBack
            $previous = $rolledBack
        } else {
            Remove-FileQuietly $rolledBack
        }
        $written = Write-ManagedFile $Checked $content $previous $Prepared
        if ((Get-Sha256 $written) -ne (Get-Sha256 $content)) {
            Restore-Previous $Checked $previous ($null -ne $old)
            throw (New-AgentException 'verify-failed' 'the file read back differs from the backup; the previous content was put back.')
        }
    } catch {
        $Item['backup'] = $null
        if ([IO.File]::Exists($path)) { Remove-FileQuietly $rolledBack }
        throw
    }
    [IO.File]::Delete($backup1)
    Move-BackupsUp $state
    $Item['new_sha256'] = Get-Sha256 $written
    $Item['status'] = 'restored'
}

function Invoke-UndoFile($Checked, [string]$Run, [string]$IfRunning, $Roots, $Context, $Item) {
    $prepared = Initialize-ManagedFile $Checked $Roots
    try {
        # Looked at again with the folders locked and the state settled.
        $write = Get-LastWrite $Checked
        if ($null -eq $write -or $write.run -cne $Run) {
            $Item['status'] = 'unchanged'
            return
        }
        if ($write.path -ne '' -and -not $write.path.Equals($Checked.path, [StringComparison]::OrdinalIgnoreCase)) {
            throw (New-AgentException 'unsafe-path' ("run {0} wrote {1}, not {2}; nothing was changed." -f $Run, $write.path, $Checked.path))
        }
        if ($write.action -ceq 'created') {
            Invoke-PreparedRemoval $Checked $prepared $Item $IfRunning $Context
        } else {
            Invoke-PreparedRestore $Checked $prepared $Item $IfRunning $Context $write
        }
        if (@('removed', 'restored') -notcontains $Item['status']) { return }
        Remove-LastWrite $prepared.state
        # Without a merge base the next push treats the file as new.
        Remove-FileQuietly ([IO.Path]::Combine($prepared.state, 'applied'))
    } finally {
        Unlock-Folders $prepared.locks
    }
}

$refusal = Test-Request $Request 'rollback'
if ($null -ne $refusal) { return $refusal }
$ifRunning = [string](Get-Field $Request 'if_running')
if ([string]::IsNullOrEmpty($ifRunning)) { $ifRunning = 'skip' }
if (@('skip', 'stop', 'force') -notcontains $ifRunning) {
    return New-RefusalAnswer 'rollback' ("if_running '{0}' not supported" -f $ifRunning)
}
$roots = @(Get-Field $Request 'appdata_roots')
$context = @{ processes = $null }

# First what each file's last write was, then the newest of them: its run is undone.
$entries = [System.Collections.Generic.List[object]]::new()
$requested = Get-Field $Request 'files'
foreach ($file in @($requested)) {
    if ($null -eq $file) { continue }
    $item = [ordered]@{
        path = (Get-Field $file 'path'); status = 'error'; old_sha256 = $null; new_sha256 = $null
        backup = $null; stopped = 0; error = $null
    }
    $entry = [pscustomobject]@{ item = $item; checked = $null; write = $null }
    try {
        $entry.checked = Test-FileRequest $file
        $entry.write = Find-LastWrite $entry.checked $roots
    } catch {
        $entry.checked = $null
        $item['error'] = ConvertTo-AgentError $_
    }
    $entries.Add($entry)
}
$newest = $null
foreach ($entry in $entries) {
    if ($null -ne $entry.write -and ($null -eq $newest -or $entry.write.ticks -gt $newest.ticks)) { $newest = $entry.write }
}
$files = [System.Collections.Generic.List[object]]::new()
foreach ($entry in $entries) {
    $item = $entry.item
    if ($null -ne $entry.checked) {
        if ($null -eq $newest -or $null -eq $entry.write -or $entry.write.run -cne $newest.run) {
            $item['status'] = 'unchanged'
        } else {
            try {
                Invoke-UndoFile $entry.checked $newest.run $ifRunning $roots $context $item
            } catch {
                $item['status'] = 'error'
                $item['error'] = ConvertTo-AgentError $_
            }
        }
    }
    $files.Add($item)
}
$run = $null
if ($null -ne $newest -and $newest.run -cne '') { $run = $newest.run }

# ToArray: a plain array, so ConvertTo-Json writes a JSON array even for one file.
return [ordered]@{ protocol = 1; op = 'rollback'; ok = $true; run = $run; files = $files.ToArray() }
