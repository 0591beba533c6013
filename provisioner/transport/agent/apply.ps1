# apply: write each file, independently and in order, so that it always holds either its old
# or its new content, with three backups and the merge base kept in the agent's state folder.
# The backups rotate only once the new content is in place and verified, so a failed write
# loses no generation. Each write is recorded in the file's history, with the request's run,
# before it happens: an agent that dies after the replace leaves the record of what it did.
$Request = $args[0]

function Invoke-PreparedApply($File, $Checked, [byte[]]$Content, [string]$Intended, $Prepared, $Item, [string]$IfRunning, $Context, [string]$Run) {
    # With the file's folders locked (Initialize-ManagedFile).
    $path = $Checked.path
    $state = $Prepared.state

    # Compare-and-swap: anything else than what inspect saw may be the user's own edit.
    $old = Read-HeldFile $path
    $current = $null
    if ($null -ne $old) { $current = Get-Sha256 $old }
    $Item['old_sha256'] = $current
    $expected = Get-Field $File 'expect_sha256'
    if ($current -ne $expected) {
        $Item['status'] = 'conflict'
        $Item['error'] = New-AgentError 'conflict' 'the file changed since inspect.'
        return
    }
    # Only now, when it will be written: a conflict must not stop anybody's MicroSIP.
    if (-not (Invoke-RunningPolicy $Checked $IfRunning $Item $Context)) { return }

    # A file a user made in place of the tool's: its history starts anew (Add-WriteRecord).
    $userMade = $false
    if ($null -ne $old) { $userMade = Test-UserMade $path }

    # The old content waits as backup.new (for SYSTEM and Administrators only): until the
    # new file is verified, no backup moves.
    $pending = [IO.Path]::Combine($state, 'backup.new')
    $backup = $null
    if ($null -ne $old) {
        Write-StateFile $state 'backup.new' $old
        $backup = $pending
    }
    $history = Read-StateFile $state 'history'
    try {
        Add-WriteRecord $state $Run $current $path $userMade
    } catch {
        if ($null -ne $backup) { Remove-FileQuietly $pending }
        throw
    }
    try {
        $writtenBytes = Write-ManagedFile $Checked $Content $backup $Prepared
    } catch {
        # Until the replace happened backup.new is no generation yet, nor the write a write of
        # its run; once it has, or while the file is missing (a replace that died half-way),
        # backup.new is the only copy of the old content and stays for the next request to
        # rotate in or put back (which then settles the record too).
        if (-not $Prepared.replaced -and [IO.File]::Exists($path) -eq ($null -ne $old)) {
            if ($null -ne $backup) { Remove-FileQuietly $pending }
            Restore-WriteHistory $state $history
        }
        throw
    }

    $written = Get-Sha256 $writtenBytes
    $Item['new_sha256'] = $written
    if ($written -ne $Intended) {
        Restore-Previous $Checked $backup ($null -ne $old)
        if ($null -ne $backup) { Remove-FileQuietly $pending; $undone = 'the previous file was put back' }
        else { $undone = 'it was removed' }
        Restore-WriteHistory $state $history
        throw (New-AgentException 'verify-failed' ('the file read back differs from the intended content; {0}.' -f $undone))
    }
    if ($null -ne $old) {
        # Written and verified: only now do the backups move. If that fails, backup.new
        # keeps the old content and the next apply or rollback rotates it in.
        try {
            Move-BackupsDown $state
            $Item['backup'] = [IO.Path]::Combine($state, 'backup.1')
        } catch {
            $Item['backup'] = $pending
        }
    }

    # The merge base of the next push, with passwords already replaced by the controller.
    $applied = Get-Field $File 'applied_b64'
    if ($null -ne $applied) {
        try {
            Write-StateFile $state 'applied' ([Convert]::FromBase64String([string]$applied))
        } catch {
            # The file itself is written: say so, or the controller would think nothing changed.
            $cause = ConvertTo-AgentError $_
            throw (New-AgentException $cause.code ('the file was written, but not its applied copy: ' + $cause.message))
        }
    }
    $Item['status'] = 'written'
}

function Invoke-ApplyFile($File, [string]$IfRunning, $Roots, $Context, [string]$Run) {
    $item = [ordered]@{
        path = (Get-Field $File 'path'); status = 'error'; old_sha256 = $null; new_sha256 = $null
        backup = $null; stopped = 0; error = $null
    }
    try {
        $checked = Test-FileRequest $File
        $encoded = Get-Field $File 'content_b64'
        $intended = Get-Field $File 'sha256'
        # Refused rather than guessed: a missing content would truncate the user's file.
        if ($null -eq $encoded -or [string]::IsNullOrEmpty($intended)) {
            throw (New-AgentException 'internal' 'the request gives no content_b64 or no sha256 for this file.')
        }
        $content = [Convert]::FromBase64String([string]$encoded)
        $prepared = Initialize-ManagedFile $checked $Roots
        try {
            Invoke-PreparedApply $File $checked $content $intended $prepared $item $IfRunning $Context $Run
        } finally {
            Unlock-Folders $prepared.locks
        }
    } catch {
        $item['status'] = 'error'
        $item['error'] = ConvertTo-AgentError $_
    }
    return $item
}

$refusal = Test-Request $Request 'apply'
if ($null -ne $refusal) { return $refusal }
$ifRunning = [string](Get-Field $Request 'if_running')
if ([string]::IsNullOrEmpty($ifRunning)) { $ifRunning = 'skip' }
if (@('skip', 'stop', 'force') -notcontains $ifRunning) {
    return New-RefusalAnswer 'apply' ("if_running '{0}' not supported" -f $ifRunning)
}
# The run this request belongs to (its writes are undone together); its own without one.
$run = [string](Get-Field $Request 'run')
if ([string]::IsNullOrEmpty($run)) { $run = [Guid]::NewGuid().ToString('N') }
if ($run -cnotmatch '^[0-9A-Za-z_-]{1,64}\z') {
    return New-RefusalAnswer 'apply' 'the run id must be 1 to 64 letters, digits, - or _'
}
$roots = @(Get-Field $Request 'appdata_roots')
$context = @{ processes = $null }

$files = [System.Collections.Generic.List[object]]::new()
$requested = Get-Field $Request 'files'
foreach ($file in @($requested)) {
    if ($null -ne $file) { $files.Add((Invoke-ApplyFile $file $ifRunning $roots $context $run)) }
}

# ToArray: a plain array, so ConvertTo-Json writes a JSON array even for one file.
return [ordered]@{ protocol = 1; op = 'apply'; ok = $true; files = $files.ToArray() }
